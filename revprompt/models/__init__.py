"""Loading and running the models every stage needs: text to image, the captioner, text and image embedders,
and the embedded miniatures of the tiny preset."""
