"""A site's own privacy terms: the most it lets any run spend of its records, set at the site.

The coordinator's run config asks for an (epsilon, delta); the site's config (its site file, or its
SuperNode's node config) holds the ceiling, and whether the site reports per-class test counts
after each round. Those counts are exact, outside epsilon, and computed under a model and a test
split the coordinator chooses (a head aimed at one note's features tells whether that note is in
the test split), so they are shared only with the site's consent
(`share-evaluation-counts = true`). A request above the ceiling, or for no DP without the site's
explicit consent (`max-epsilon = "inf"`), is refused before any record is read or any step taken; a
stricter request is honoured and becomes the ledger's target. A site that set no `max-epsilon`
trains nothing: its privacy terms are its own decision, never a default of the coordinator's
choosing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medtune.config import PrivacyConfig
from medtune.epsilon import NO_DP, read_epsilon, show_epsilon
from medtune.errors import ConfigError, EvaluationWithheldError, PrivacyTermsError

TERMS_KEYS = ("max-epsilon", "max-delta", "share-evaluation-counts", "secure-aggregation")
# the usual ceiling; a site with over 100,000 records should set a smaller one
DEFAULT_MAX_DELTA = 1e-5


@dataclass(frozen=True)
class SiteTerms:
    """What a site accepts: an epsilon and delta ceiling, and whether it reports per-class test
    counts."""

    max_epsilon: float | None  # None: not configured, so nothing is trained; inf: consent to no DP
    max_delta: float = DEFAULT_MAX_DELTA
    # they are outside epsilon: shared only with the site's consent
    share_evaluation_counts: bool = False
    # true: the site sends its prompt and head only masked (SecAgg+), never in clear
    secure_aggregation: bool = False

    @classmethod
    def from_values(cls, values: Mapping[str, Any], source: str) -> "SiteTerms":
        """The terms among `values` (a node config or site file), each checked once; `source` names
        where."""
        max_epsilon = None
        if values.get("max-epsilon") not in (None, ""):
            max_epsilon = read_epsilon(values["max-epsilon"], f"{source} max-epsilon")
        max_delta = values.get("max-delta", DEFAULT_MAX_DELTA)
        if (
            isinstance(max_delta, bool)
            or not isinstance(max_delta, (int, float))
            or not 0.0 < max_delta < 1.0
        ):
            raise ConfigError(
                f"{source} max-delta: {max_delta!r} must be a number strictly between 0 and 1"
            )
        share, secure = (
            values.get(key, False) for key in ("share-evaluation-counts", "secure-aggregation")
        )
        for key, value in (("share-evaluation-counts", share), ("secure-aggregation", secure)):
            if not isinstance(value, bool):
                raise ConfigError(f"{source} {key}: {value!r} must be true or false")
        return cls(
            max_epsilon=max_epsilon,
            max_delta=float(max_delta),
            share_evaluation_counts=share,
            secure_aggregation=secure,
        )

    def check(self, privacy: PrivacyConfig) -> None:
        """Refuse, naming the key, a run whose privacy request this site has not agreed to."""
        if self.max_epsilon is None:
            raise PrivacyTermsError(
                "this site has set no max-epsilon, so it trains for no run; set max-epsilon (its "
                "ceiling for every run) in its site file or node config, or max-epsilon = "
                f'"{NO_DP}" to consent to runs without DP'
            )
        if not privacy.is_private and math.isfinite(self.max_epsilon):
            raise PrivacyTermsError(
                f"the run config asks for epsilon={NO_DP} (no DP); this site's max-epsilon is "
                f"{show_epsilon(self.max_epsilon)}, and training without DP needs max-epsilon = "
                f'"{NO_DP}"'
            )
        if privacy.epsilon > self.max_epsilon:
            raise PrivacyTermsError(
                f"the run config asks for epsilon={show_epsilon(privacy.epsilon)}, above this "
                f"site's max-epsilon {show_epsilon(self.max_epsilon)}"
            )
        if privacy.delta > self.max_delta:
            raise PrivacyTermsError(
                f"the run config asks for delta={privacy.delta:g}, above this site's max-delta "
                f"{self.max_delta:g}"
            )

    def check_sent_in_clear(self) -> None:
        """Refuse to send this site's prompt and head unmasked if its terms require secure
        aggregation."""
        if self.secure_aggregation:
            raise PrivacyTermsError(
                "this site's secure-aggregation is true: it sends its prompt and head only through "
                "secure aggregation, and this round asked for them in clear (run the federation "
                "with secure-aggregation=true)"
            )

    def check_evaluation_shared(self) -> None:
        """Refuse to report per-class test counts (outside epsilon) if the site's terms withhold
        them."""
        if not self.share_evaluation_counts:
            raise EvaluationWithheldError(
                "this site's share-evaluation-counts is false (the default): its per-class test "
                "counts, which are outside epsilon, stay at the site"
            )
