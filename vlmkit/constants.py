"""Constants shared by the data and model layers (so neither has to import the other for them)."""

IGNORE_INDEX = -100  # label of a position that carries no loss (prompts, images, padding)
