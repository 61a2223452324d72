"""The API key of a flow run: from a Prefect Secret block, or from the environment.

Never a flow parameter: parameters are stored by the Prefect server, shown in the UI and
copied into every retry. Each shard resolves the key itself, on the worker that runs it.
"""

from __future__ import annotations

import os

from pipeline.errors import ConfigError
from pipeline.run import KEY_ENV


async def resolve_api_key(block_name: str | None, dialect: str) -> str:
    """The key from Secret block ``block_name``, else from ``$FREEPIK_API_KEY``/``$BFL_API_KEY``."""
    env_name = KEY_ENV.get(dialect, "FREEPIK_API_KEY")
    if block_name:
        from prefect.blocks.system import Secret

        try:
            block = await Secret.aload(block_name)
        except ValueError:
            raise ConfigError(
                f"no Prefect Secret block named {block_name!r}; create it with "
                f"`prefect block create secret` or in the UI (Blocks > Secret), or leave "
                f"api_key_block empty to read ${env_name}"
            ) from None
        value = block.get()
        key = value if isinstance(value, str) else ""
        if not key.strip():
            raise ConfigError(f"Prefect Secret block {block_name!r} is empty or not text")
        return key.strip()
    key = os.environ.get(env_name, "").strip()
    if not key:
        raise ConfigError(
            f"no API key: set ${env_name} where the flow runs, or pass api_key_block with "
            "the name of a Prefect Secret block holding it"
        )
    return key
