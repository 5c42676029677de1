"""Each method's pass and its features from cached moments."""
