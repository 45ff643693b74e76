"""The embedded toy world: procedural text-to-video clips with known ground truth, a tiny
Wan teacher and a 3-step sparse student trained by fastwan itself, and a probe that scores
generated clips against their prompts (see ``fastwan demo``)."""
