"""Plain-Python tagging library: safe image decoding, the prepared training set, the WD14 tagger, caption rules
and concept tags, and optional BLIP captions. It never imports dagster, and imports torch only inside the BLIP
captioner, so everything else runs (and is tested) without either."""
