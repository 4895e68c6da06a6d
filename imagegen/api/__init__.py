"""HTTP layer: validate, hand to the engine, turn released images into JSON."""
