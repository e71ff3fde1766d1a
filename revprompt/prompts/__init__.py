"""The prompt-set contract: prompt sources (styles.csv, JSONL, text), normalisation and splits, the prepared index."""
