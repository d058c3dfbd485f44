"""Project exceptions: every failure a user can act on is one of these, with a message naming the
place."""


class MedTuneError(Exception):
    """Base class for errors MedTune reports to the user without a traceback."""


class ConfigError(MedTuneError):
    """A configuration value is missing, out of range or inconsistent."""


class DataError(MedTuneError):
    """A hospital's records file cannot be used; the message names file, row and problem."""


class PrivacyBudgetError(MedTuneError):
    """Training would take a hospital past its (epsilon, delta) target."""


class LedgerError(MedTuneError):
    """A privacy ledger file is missing fields, corrupted or belongs to another configuration."""


class StateError(MedTuneError):
    """Arrays offered as the exchanged state do not match its names, shapes or dtypes."""


class CheckpointError(MedTuneError):
    """A checkpoint directory is incomplete, corrupted or made for another backbone."""


class FederationError(MedTuneError):
    """A federated run ended without a usable result (no hospital ever trained)."""


class PrivacyTermsError(MedTuneError):
    """A run asks a site for more privacy loss than the site's own terms allow (or the site set
    none)."""


class EvaluationWithheldError(PrivacyTermsError):
    """The site's terms keep its per-class test counts (outside epsilon) at the site."""


class CodeNotApprovedError(MedTuneError):
    """The coordinator sent code (a FAB) that this site has not approved."""


class HospitalNameError(MedTuneError):
    """Two nodes claim one hospital name, or a node changed its name mid-run
    (medtune/ledger_record.py)."""


class SecureAggregationError(MedTuneError):
    """This site's update cannot be masked faithfully (its weight or a value is outside SecAgg+'s
    range)."""
