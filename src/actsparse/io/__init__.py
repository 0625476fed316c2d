"""What comes in and goes out: evaluation and calibration text, models, recipes."""
