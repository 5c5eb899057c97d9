"""`fusion demo`: a real fusion experiment built from text every Python installation has."""
