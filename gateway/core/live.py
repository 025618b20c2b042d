"""The settings in force, swapped as one object on reload so a request never sees half of each."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.auth import KeyIndex
from gateway.core.config import AdminKey, KeyConfig, Settings
from gateway.core.normalize import Rules


@dataclass(frozen=True, slots=True)
class Snapshot:
    settings: Settings
    team_keys: KeyIndex[KeyConfig]
    admin_keys: KeyIndex[AdminKey]

    @classmethod
    def of(cls, settings: Settings) -> Snapshot:
        return cls(
            settings=settings,
            team_keys=KeyIndex.for_teams(settings.teams),
            admin_keys=KeyIndex((key.sha256, key) for key in settings.all_admin_keys()),
        )

    def rules_for(self, team: str) -> Rules:
        return Rules(
            max_image_bytes=self.settings.server.max_image_bytes,
            model_aliases=self.settings.model_aliases,
            default_response_format=self.settings.teams[team].default_response_format,
        )


class LiveConfig:
    """Holds the current ``Snapshot``; ``reload`` replaces it whole."""

    def __init__(self, settings: Settings) -> None:
        self.current = Snapshot.of(settings)

    def reload(self, new: Settings) -> list[str]:
        """Apply ``new`` for the next requests; returns the changed settings that need a restart."""
        merged, kept = self.current.settings.reloaded(new)
        self.current = Snapshot.of(merged)
        return kept
