"""Flow-matching math and samplers."""
