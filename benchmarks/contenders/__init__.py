"""The clients the benchmark compares, each a script run in its own process.

Every contender reads the same CSV manifest, talks to the same simulator with the same key
(from ``$FREEPIK_API_KEY``) and tier, and stores every image it gets under ``OUT/images/``,
so that the figures compare like with like. The alternatives (vendor sample, naive async,
Prefect per row) are written the way a competent user would write them, with the usual
retry on 429/503 and dropped connections, and nothing cleverer.
"""
