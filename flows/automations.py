"""Create or update the project's Prefect automations (``automations.yaml``) by name.

``prefect automation create --from-file automations.yaml`` creates a second copy each time
it runs, and two copies of the rerun automation would schedule a lost night twice; this
applies the file as ``prefect deploy`` applies ``prefect.yaml``: an automation of the same
name is updated (extra copies deleted), a new one created. Run it from the repository root
against the server of the work pool::

    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/python -m flows.automations
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml

#: The file beside ``prefect.yaml``.
AUTOMATIONS_FILE = Path(__file__).resolve().parents[1] / "automations.yaml"


def load(path: Path = AUTOMATIONS_FILE) -> list[Any]:
    """The automations of ``path``, validated as Prefect's own CLI validates them."""
    from prefect.events.schemas.automations import AutomationCore

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    items = data["automations"] if isinstance(data, dict) and "automations" in data else data
    if isinstance(items, dict):
        items = [items]
    return [AutomationCore.model_validate(item) for item in items]


async def apply(path: Path = AUTOMATIONS_FILE) -> list[tuple[str, UUID, bool]]:
    """Create or update every automation of ``path``: (name, id, created) for each."""
    from prefect.client.orchestration import get_client

    done: list[tuple[str, UUID, bool]] = []
    async with get_client() as client:
        for automation in load(path):
            existing = await client.read_automations_by_name(automation.name)
            if existing:
                first, *extra = existing
                await client.update_automation(first.id, automation)
                for copy in extra:  # left by `prefect automation create` run twice
                    await client.delete_automation(copy.id)
                done.append((automation.name, first.id, False))
            else:
                done.append((automation.name, await client.create_automation(automation), True))
    return done


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.automations [FILE]``: apply FILE (``automations.yaml``)."""
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else AUTOMATIONS_FILE
    for name, automation_id, created in asyncio.run(apply(path)):
        print(f"{'created' if created else 'updated'} automation {name!r} ({automation_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
