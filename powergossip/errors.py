"""The two kinds of mistakes a user can make in a configuration, raised before any work.

ConfigError: a key of an entrypoint's config that cannot work (the message names the key).
SettingError: a setting of a method or a compressor that cannot work; `setting` is its name
(the config field, `rank`), so that the entrypoints report it under the user's key
(`optimizer_rank`) without reading the message. Both are ValueErrors.
"""


class ConfigError(ValueError):
    """A configuration that cannot work; the message says which key and why."""


class SettingError(ValueError):
    """A method's or compressor's setting that cannot work: `setting` names it, `reason` says why."""

    def __init__(self, setting: str, reason: str):
        super().__init__(f"{setting} {reason}")
        self.setting, self.reason = setting, reason


def require(condition: bool, setting: str, reason: str) -> None:
    """SettingError(setting, reason) unless `condition`: how a settings dataclass's __post_init__ complains."""
    if not condition:
        raise SettingError(setting, reason)
