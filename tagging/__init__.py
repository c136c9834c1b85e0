"""Plain-Python tagging library: safe image decoding, the prepared training set, the WD14 tagger and caption
rules. It never imports dagster or torch, so it runs (and is tested) without either."""
