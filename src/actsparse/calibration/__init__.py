"""Calibration text at work: measuring the dense model (``measure``), each layer's cost alone
(``sensitivity``), and fitting the learned corrections (``fitting``)."""
