"""Synthetic hospitals: realistic, deliberately hard clinical notes, the embedded default data.

Why it is hard (and so shows what privacy costs):
- presenting symptoms overlap across services (chest pain: cardiac, pulmonary or gastric;
  dizziness: cardiac or neurological; fever: pulmonary, abdominal or infectious);
- the deciding findings are often absent, and other services' findings appear negated
  ("denies melena", "troponin negative") or as past history ("PMH: CAD"), so keyword
  spotting fails and negation must be read;
- every hospital writes differently (templates, abbreviations, negation phrasing);
- hospitals differ in label mix (Dirichlet) and size (log-normal), and a few labels are wrong.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medtune.synth_config import LABELS, SynthConfig

# symptom -> (surface forms, abbreviation, services it points to)
SYMPTOMS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "chest_pain": (
        ("chest pain", "chest discomfort", "chest pressure", "substernal pain"),
        "CP",
        ("cardiology", "pulmonology", "gastroenterology"),
    ),
    "dyspnea": (
        ("shortness of breath", "dyspnea", "difficulty breathing", "breathlessness"),
        "SOB",
        ("cardiology", "pulmonology", "infectious_disease"),
    ),
    "dizziness": (
        ("dizziness", "lightheadedness", "near-syncope", "vertigo"),
        "dizzy",
        ("cardiology", "neurology"),
    ),
    "syncope": (
        ("syncope", "a syncopal episode", "passing out", "loss of consciousness"),
        "LOC",
        ("cardiology", "neurology"),
    ),
    "palpitations": (
        ("palpitations", "racing heart", "heart fluttering"),
        "palps",
        ("cardiology",),
    ),
    "cough": (
        ("cough", "productive cough", "dry cough", "persistent cough"),
        "cough",
        ("pulmonology", "infectious_disease"),
    ),
    "fever": (
        ("fever", "fevers and chills", "subjective fevers", "rigors"),
        "fever",
        ("infectious_disease", "pulmonology", "gastroenterology"),
    ),
    "nausea": (
        ("nausea", "nausea and vomiting", "emesis", "queasiness"),
        "N/V",
        ("gastroenterology", "neurology", "cardiology", "infectious_disease"),
    ),
    "abdominal_pain": (
        ("abdominal pain", "epigastric pain", "belly pain", "RUQ pain"),
        "abd pain",
        ("gastroenterology", "infectious_disease"),
    ),
    "headache": (
        ("headache", "severe headache", "head pain"),
        "HA",
        ("neurology", "infectious_disease"),
    ),
    "weakness": (
        ("weakness", "generalized weakness", "fatigue", "malaise"),
        "weak",
        ("neurology", "cardiology", "infectious_disease"),
    ),
    "confusion": (
        ("confusion", "altered mental status", "disorientation"),
        "AMS",
        ("neurology", "infectious_disease"),
    ),
    "diarrhea": (
        ("diarrhea", "loose stools", "watery stools"),
        "diarrhea",
        ("gastroenterology", "infectious_disease"),
    ),
    "wheezing": (("wheezing", "chest tightness"), "wheeze", ("pulmonology",)),
    "numbness": (("numbness", "tingling", "paresthesias"), "numb", ("neurology",)),
}

# deciding findings per service: (positive phrase, negated phrase)
FINDINGS: dict[str, tuple[tuple[str, str], ...]] = {
    "cardiology": (
        ("troponin elevated at 2.1", "troponin negative"),
        ("ECG with ST elevation in II, III, aVF", "ECG without ischemic changes"),
        ("new atrial fibrillation with RVR", "normal sinus rhythm"),
        ("echo shows EF of 30 percent", "echo with preserved EF"),
        ("bilateral pitting edema and JVD", "no peripheral edema"),
        ("BNP 1450", "BNP within normal limits"),
    ),
    "pulmonology": (
        ("diffuse expiratory wheezes", "lungs clear to auscultation"),
        ("SpO2 86 percent on room air", "SpO2 98 percent on room air"),
        ("CT angiogram with segmental PE", "CT angiogram negative for PE"),
        ("hyperinflated lungs on CXR", "CXR without acute process"),
        ("FEV1/FVC 0.58 on spirometry", "normal spirometry"),
        ("responded to nebulized albuterol", "no bronchodilator response"),
    ),
    "gastroenterology": (
        ("melena for two days", "no melena"),
        ("lipase 1200", "lipase normal"),
        ("epigastric tenderness with guarding", "abdomen soft and nontender"),
        ("hematemesis", "no hematemesis"),
        ("EGD showing duodenal ulcer", "EGD unremarkable"),
        ("elevated LFTs with bilirubin 4.2", "LFTs normal"),
    ),
    "neurology": (
        ("left facial droop and arm drift", "no focal neurological deficits"),
        ("expressive aphasia", "speech fluent"),
        ("MRI with acute infarct in the left MCA territory", "MRI brain negative"),
        ("EEG with epileptiform discharges", "EEG normal"),
        ("tongue bite after witnessed tonic-clonic activity", "no seizure activity witnessed"),
        ("nystagmus and ataxic gait", "gait steady"),
    ),
    "infectious_disease": (
        ("blood cultures growing gram-positive cocci", "blood cultures no growth"),
        ("lactate 4.1 with WBC 19.8", "WBC normal"),
        ("started on vancomycin and cefepime", "no antibiotics indicated"),
        ("positive urinalysis with nitrites", "urinalysis negative"),
        ("cellulitis with spreading erythema", "skin without erythema"),
        ("procalcitonin 6.3", "procalcitonin low"),
    ),
}

HISTORY = {
    "cardiology": ("CAD", "HFrEF", "atrial fibrillation", "hypertension"),
    "pulmonology": ("COPD", "asthma", "OSA", "prior PE"),
    "gastroenterology": ("GERD", "peptic ulcer disease", "cirrhosis", "IBD"),
    "neurology": ("prior stroke", "epilepsy", "migraine", "TIA"),
    "infectious_disease": (
        "HIV on ART",
        "recurrent UTIs",
        "prior MRSA bacteremia",
        "diabetes with foot ulcer",
    ),
}

NEGATION_STYLES = (
    "denies {}",
    "no {}",
    "negative for {}",
    "{} absent",
    "(-) {}",
)
TEMPLATES = (
    "{age}{sex} presents with {symptoms}. {history} {findings} {negatives} Plan: {plan}",
    "CC: {symptoms}. HPI: {age} yo {sexword} with {history_short}, {onset}. Exam/data: {findings} "
    "ROS: {negatives} A/P: {plan}",
    "S: pt reports {symptoms} x {days} days. {history} "
    "O: {findings} {negatives} A: see plan. P: {plan}",
    "Patient is a {age} year old {sexword} seen for {symptoms}, {onset}. "
    "{findings} {negatives} {history} Will {plan}",
    "{age}{sex}, {history_short}. c/o {symptoms}. {negatives} {findings} -> {plan}",
)
PLANS = (
    "admit for further workup",
    "consult the relevant service",
    "observe overnight and reassess",
    "discharge with close follow-up",
    "repeat labs in the morning",
    "start empiric therapy and monitor",
)
ONSETS = (
    "onset this morning",
    "gradual over a week",
    "sudden onset at rest",
    "worse with exertion",
    "intermittent for days",
)


@dataclass(frozen=True)
class HospitalStyle:
    """How one hospital writes: its templates, how often it abbreviates, how it negates."""

    templates: tuple[str, ...]
    abbreviation_rate: float
    negations: tuple[str, ...]

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "HospitalStyle":
        templates = tuple(rng.choice(TEMPLATES, size=2, replace=False))
        negations = tuple(rng.choice(NEGATION_STYLES, size=2, replace=False))
        return cls(
            templates=templates, abbreviation_rate=float(rng.uniform(0.0, 0.7)), negations=negations
        )


def _symptom_phrase(key: str, style: HospitalStyle, rng: np.random.Generator) -> str:
    forms, abbreviation, _ = SYMPTOMS[key]
    return abbreviation if rng.random() < style.abbreviation_rate else str(rng.choice(forms))


def _note(label: str, style: HospitalStyle, rng: np.random.Generator) -> str:
    compatible = [key for key, (_, _, services) in SYMPTOMS.items() if label in services]
    symptoms = [
        str(s)
        for s in rng.choice(
            compatible, size=min(len(compatible), int(rng.integers(1, 4))), replace=False
        )
    ]
    # Deciding findings: none in a third of notes (the presentation alone must decide).
    n_findings = int(rng.choice([0, 1, 2], p=[0.35, 0.45, 0.2]))
    own = FINDINGS[label]
    findings = [own[i][0] for i in rng.choice(len(own), size=n_findings, replace=False)]
    others = [other for other in LABELS if other != label]
    negatives = []
    for other in rng.choice(others, size=int(rng.integers(1, 3)), replace=False):
        negated = FINDINGS[str(other)][int(rng.integers(len(FINDINGS[str(other)])))][1]
        negatives.append(
            str(rng.choice(style.negations)).format(negated) if rng.random() < 0.5 else negated
        )
    # A misleading positive: a distractor service's finding as past history or an incidental
    # finding.
    history_service = str(rng.choice(LABELS)) if rng.random() < 0.6 else label
    history_item = str(rng.choice(HISTORY[history_service]))
    age = int(rng.integers(19, 92))
    sex = str(rng.choice(["M", "F"]))
    fields = {
        "age": age,
        "sex": sex,
        "sexword": "man" if sex == "M" else "woman",
        "symptoms": " and ".join(_symptom_phrase(s, style, rng) for s in symptoms),
        "history": f"PMH significant for {history_item}.",
        "history_short": f"h/o {history_item}",
        "findings": ("; ".join(findings) + ".") if findings else "",
        "negatives": (", ".join(negatives) + "."),
        "plan": str(rng.choice(PLANS)),
        "onset": str(rng.choice(ONSETS)),
        "days": int(rng.integers(1, 10)),
    }
    text = str(rng.choice(style.templates)).format(**fields)
    return " ".join(text.split())


def hospital_sizes(config: SynthConfig, rng: np.random.Generator) -> list[int]:
    raw = rng.lognormal(mean=0.0, sigma=config.size_skew, size=config.hospitals)
    return [max(40, int(round(config.mean_records * r / raw.mean()))) for r in raw]


def generate_hospitals(config: SynthConfig) -> list[list[tuple[str, str]]]:
    """(text, label) records per hospital; the same config gives the same notes."""
    rng = np.random.default_rng(config.seed)
    sizes = hospital_sizes(config, rng)
    hospitals = []
    for size in sizes:
        style = HospitalStyle.draw(rng)
        mix = rng.dirichlet([config.dirichlet_alpha] * len(LABELS))
        records = []
        for _ in range(size):
            true_label = str(rng.choice(LABELS, p=mix))
            text = _note(true_label, style, rng)
            written = str(rng.choice(LABELS)) if rng.random() < config.label_noise else true_label
            records.append((text, written))
        hospitals.append(records)
    return hospitals


def write_hospitals(config: SynthConfig, out_dir: str | Path) -> list[Path]:
    """Write hospital_1.csv ... hospital_N.csv (columns text, label) and return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, records in enumerate(generate_hospitals(config), start=1):
        path = out / f"hospital_{number}.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(records)
        paths.append(path)
    return paths
