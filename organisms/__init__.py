"""Model organisms: small VLMs of the real classes, trained here on the synthetic settings, so that every
experiment has a real mechanism to find on a laptop. train.py trains and evaluates them; each organism's weights
and card ship in a directory of their own (organism/)."""
