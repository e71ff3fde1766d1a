"""models/builtin: names that say what they are, and the earlier names still loading the same models."""

from __future__ import annotations

import logging

import torch

from revprompt.models import builtin
from revprompt.models.builtin import builtin_name
from revprompt.models.captioner import build_captioner
from revprompt.models.text_to_image import build_pipeline


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_earlier_names_map_to_todays_with_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(builtin, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="revprompt.models.builtin"):
        assert builtin_name("text_to_image", "tiny") == "miniature"
        assert builtin_name("text_to_image", "tiny") == "miniature"
        assert builtin_name("captioner", "tiny") == "random-tiny"  # the same old word meant another model here
        assert builtin_name("captioner", "tiny-warm") == "miniature"
        assert builtin_name("image_embedder", "tiny") == "random-tiny"
        assert builtin_name("captioner", "Salesforce/blip-image-captioning-base") == "Salesforce/blip-image-captioning-base"
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["the built-in text to image 'tiny' is called 'miniature' now; the old name still works",
                        "the built-in captioner 'tiny' is called 'random-tiny' now; the old name still works",
                        "the built-in captioner 'tiny-warm' is called 'miniature' now; the old name still works",
                        "the built-in image embedder 'tiny' is called 'random-tiny' now; the old name still works"]


def test_old_and_new_names_load_the_same_weights():
    assert same_weights(build_pipeline("tiny").unet, build_pipeline("miniature").unet)
    assert same_weights(build_pipeline("tiny-random").unet, build_pipeline("random-tiny").unet)
    assert same_weights(build_captioner("tiny-warm")[0], build_captioner("miniature")[0])
    assert same_weights(build_captioner("tiny")[0], build_captioner("random-tiny")[0])
    assert not same_weights(build_captioner("miniature")[0], build_captioner("random-tiny")[0])
