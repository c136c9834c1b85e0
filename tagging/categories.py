"""Tag categories as selected_tags.csv numbers them (Danbooru's numbering), shared by the tagger and the
caption rules without pulling onnxruntime into the caption stage."""

GENERAL_CATEGORY = 0
CHARACTER_CATEGORY = 4
RATING_CATEGORY = 9
