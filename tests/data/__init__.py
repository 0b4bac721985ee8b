"""Tests for data/."""
