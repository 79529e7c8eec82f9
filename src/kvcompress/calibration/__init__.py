"""Offline calibration of methods that need statistics of the model (``kvcompress calibrate <method>``)."""
