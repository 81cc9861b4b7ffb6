"""
Where the demo's backbones live in the clone: the tiny ones committed, the real ones converted by
`python -m tools.demo_assets` (not committed; see .gitignore). Only the tools and tests use these paths.
"""
from capkit.hub import REPO_DIR

DEMO_DIR = REPO_DIR / "demo"
DEMO_CLIP_DIR, DEMO_LM_DIR = DEMO_DIR / "clip-tiny", DEMO_DIR / "qwen3-tiny"
REAL_DECODER_DIR = DEMO_DIR / "smollm2-135m"        # not committed: ~540 MB (see .gitignore)
REAL_ENCODER_DIR = DEMO_DIR / "efficientnet-lite0"  # not committed: ~19 MB; lite1/2 go beside it
