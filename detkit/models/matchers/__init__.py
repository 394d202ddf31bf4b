"""Prediction-to-target matchers (Hungarian): fills MATCHERS."""
