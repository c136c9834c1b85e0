"""The words the tiny models' tokenizers know whole (CLIP BPE for tiny-sd, WordPiece for tiny-blip); anything
else falls back to smaller pieces, as with the real tokenizers. Kept apart so a builder imports only its own
framework."""

WORDS = """
a an the of in on at with and by for to from my one two this that its his her their
photo picture rendering painting drawing sketch illustration image render art style artwork
close up cropped dark bright clean dirty good bad large small big little cool weird nice
beautiful pretty cute face hat character person girl boy man woman cat dog animal creature
red orange yellow green blue purple pink white black grey gray brown colour color colours
background simple solo stripes striped gradient noise flat round pointed eyes eye portrait
theme rating general sensitive questionable explicit high quality masterpiece best worst
""".split()
