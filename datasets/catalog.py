"""The benchmark catalog: one row per dataset, nothing else.

A row gives the registered name, the imaging modality, the folder under
``DATASET.ROOT`` that holds ``data_split.json``, the sub-folder (inside that
folder) the split's relative image paths start from, and the class names in
label order. Adding a benchmark means adding a row here and a descriptions
file ``llm_descriptions/<name>.json``. A user's own dataset needs no row: it is
declared in a file next to its data (see ``datasets/declared.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

# The sentence each modality's zero-shot prompt is built from; "{}" is the
# class name with underscores turned into spaces.
MODALITY_TEMPLATES = {
    "fundus": "a fundus image of {}.",
    "oct": "an oct retinal image of {}.",
    "slo": "a SLO image of {}.",
    "ffa": "a FFA image of {}.",
    "slit_lamp": "a Slit Lamp image of {}.",
    "multi_eye": "a photo of a {}.",
    "pathology": "a pathology image of {}.",
    "xray": "a X-ray image of {}.",
    "ct": "a CT image of {}.",
    "mri": "a MRI image of {}.",
    "ultrasound": "a ultrasound image of {}.",
    "endoscopy": "an Endoscopy image of {}.",
    "dermoscopy": "a dermoscopy image of {}.",
    "synthetic": "a synthetic medical image of {}.",
}

# Human-readable modality names, used by the description generator's questions.
MODALITY_NAMES = {
    "fundus": "color fundus photographs",
    "oct": "optical coherence tomography (OCT) retinal scans",
    "slo": "scanning laser ophthalmoscopy (SLO) images",
    "ffa": "fundus fluorescein angiography (FFA) images",
    "slit_lamp": "slit lamp photographs of the eye",
    "multi_eye": "ophthalmic images",
    "pathology": "histopathology slides (H&E stained tissue)",
    "xray": "X-ray images",
    "ct": "computed tomography (CT) scans",
    "mri": "magnetic resonance imaging (MRI) scans",
    "ultrasound": "ultrasound images",
    "endoscopy": "endoscopy images",
    "dermoscopy": "dermoscopy images of skin lesions",
    "synthetic": "synthetic medical images",
}

EYE_MODALITIES = ("fundus", "oct", "slo", "ffa", "slit_lamp", "multi_eye")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    modality: str
    classnames: tuple
    dataset_dir: str = ""
    image_subdir: str = ""
    template: str = ""
    # Data generated on first use (the synthetic demo) rather than provided by the user.
    generated: bool = False
    # Descriptions file of a declared dataset; empty = llm_descriptions/<name>.json.
    descriptions: str = ""
    # The file that declared the dataset; empty for catalog rows.
    declared_in: str = ""
    # Name of the dataset folder's own split file; empty = data_split.json.
    split_file: str = ""
    # Where the published split comes from when none is shipped (said when it is missing).
    split_hint: str = ""
    # The benchmark suite the row belongs to ("" = this project's benchmarks) and the backbone the
    # sweeps use for it when BACKBONE is not set ("" = the project's default).
    suite: str = ""
    backbone: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not self.dataset_dir:
            object.__setattr__(self, "dataset_dir", self.name)
        if not self.template:
            object.__setattr__(self, "template", MODALITY_TEMPLATES[self.modality])

    @property
    def num_classes(self):
        return len(self.classnames)


def _row(name, modality, classnames, image_subdir=""):
    return CatalogEntry(name=name, modality=modality, classnames=tuple(classnames), image_subdir=image_subdir)


BENCHMARKS = [
    # ---- ophthalmology: fundus photographs
    _row("ODIR_3x200", "fundus", ["normal", "myopia", "cataract"], image_subdir="odir_3x200"),
    _row("ODIR", "fundus", [
        "normal", "diabetes", "glaucoma", "cataract", "age-related_macular_degeneration",
        "hypertension", "myopia", "other_diseases_or_abnormalities",
    ], image_subdir="odir"),
    _row("f1000images", "fundus", [
        "Maculopathy", "Bietti crystalline dystrophy", "Massive hard exudates",
        "Blur fundus without Proliferative Diabetic Retinopathy", "macular_hole",
        "Blur fundus with suspected Proliferative Diabetic Retinopathy", "Myelinated nerve fiber",
        "Branch Retinal Vein Occlusion", "normal", "Chorioretinal atrophy-coloboma", "Optic atrophy",
        "Congenital disc abnormality", "Pathological myopia", "Cotton-wool spots",
        "Peripheral retinal degeneration and break", "Central Retinal Vein Occlusion", "Possible glaucoma",
        "central_serous_chorioretinopathy", "Preretinal hemorrhage", "Disc swelling and elevation",
        "retinal_artery_occlusion", "diabetic_retinopathy Stage 1", "Retinitis pigmentosa",
        "diabetic_retinopathy Stage 2", "Rhegmatogenous Retinal Detachment", "diabetic_retinopathy Stage 3",
        "Severe hypertensive retinopathy", "Dragged Disc", "Silicon oil in eye", "epiretinal_membrane",
        "Tessellated fundus", "Fibrosis", "Vessel tortuosity", "Fundus neoplasm", "Vitreous particles",
        "VKH disease", "Large optic cup", "Yellow-white spots-flecks", "Laser Spots",
    ]),
    # ---- ophthalmology: other imaging
    _row("OCT_C8", "oct", [
        "age-related_macular_degeneration", "central_serous_retinopathy", "choroidal_neovascularization",
        "diabetic_macular_edema", "diabetic_retinopathy", "drusen", "macular_hole", "normal",
    ]),
    _row("OCTDL", "oct", [
        "age-related_macular_degeneration", "diabetic_macular_edema", "epiretinal_membrane", "normal",
        "retinal_artery_occlusion", "retinal_vein_occlusion", "vitreomacular_interface_disease",
    ]),
    _row("SLID_E", "slit_lamp", ["normal", "mild_epiphype", "moderate_epiphype", "severe_epiphype"]),
    _row("SLO", "slo", ["diabetic_retinopathy", "macular_edema", "glaucoma", "normal"], image_subdir="Retina-SLO"),
    _row("FFA", "ffa", [
        "age-related_macular_degeneration", "central_serous_retinopathy", "diabetic_retinopathy", "normal",
        "retinal_vein_occlusion",
    ]),
    _row("modaldiff", "multi_eye", ["oct", "Retinal_Fundus", "Slit_Lamp_Image", "Retina_SLO", "FFA"]),
    # ---- histopathology
    _row("SkinCancer", "pathology", [
        "nontumor_skin_chondraltissue_chondraltissue", "nontumor_skin_dermis_dermis",
        "nontumor_skin_elastosis_elastosis", "nontumor_skin_epidermis_epidermis",
        "nontumor_skin_hairfollicle_hairfollicle", "nontumor_skin_muscle_skeletal",
        "nontumor_skin_necrosis_necrosis", "nontumor_skin_nerves_nerves",
        "nontumor_skin_sebaceousglands_sebaceousglands", "nontumor_skin_subcutis_subcutis",
        "nontumor_skin_sweatglands_sweatglands", "nontumor_skin_vessel_vessel", "tumor_skin_epithelial_bcc",
        "tumor_skin_epithelial_sqcc", "tumor_skin_melanoma_melanoma", "tumor_skin_naevus_naevus",
    ], image_subdir="data"),
    _row("NCT", "pathology", [
        "Adipose", "Background", "Cancer-associated_stroma", "Colorectal_adenocarcinoma_epithelial", "Debris",
        "Lymphocytes", "Mucus", "Normal_colon_mucosa", "Smooth_muscle",
    ]),
    _row("LC2500", "pathology", [
        "Benign_colonic_tissue", "Benign_lung_tissue", "Colon _adenocarcinoma", "Lung_adenocarcinoma",
        "Lung_squamous_cell_carcinoma",
    ]),
    _row("LungHist700", "pathology", [
        "Moderately_differentiated_adenocarcinoma", "Normal", "Poorly_differentiated_adenocarcinoma",
        "Pulmonary_squamous_cell_carcinoma_moderately_differentiatedd",
        "Pulmonary_squamous_cell_carcinoma_poorly_differentiatedd",
        "Pulmonary_squamous_cell_carcinoma_well_differentiatd", "Well-differentiated_adenocarcinoma",
    ]),
    _row("BreakHis", "pathology", ["benign_breast", "malignant_breast"]),
    # ---- radiology, ultrasound, endoscopy
    _row("Breast_Ultrasound", "ultrasound", ["Benign_breast", "Malignant_breast_cancer", "Normal_breast_tissue"]),
    _row("Breast_MRI", "mri", ["Health_breast", "Sick_breast"]),
    _row("Br35H", "mri", ["Non_tumorous", "Tumorous"]),
    _row("MIAS", "xray", [
        "Circumscribed masses", "Normal mammography scans", "Other", "Asymmetry", "Architectural distortion",
        "Spiculated masses", "Calcification",
    ]),
    _row("Chest_Xray", "xray", ["covid", "normal", "pneumonia"]),
    _row("COVID_19", "xray", ["COVID", "Lung_Opacity", "Normal_lung", "Viral_pneumonia"]),
    _row("Knee", "xray", [
        "Doubtful_knee_osteoarthritis", "Mild_knee_osteoarthritis", "Moderate__knee_osteoarthritis",
        "Normal_knee_osteoarthritis", "Severe_knee_osteoarthritis",
    ], image_subdir="data"),
    _row("Chest_CT", "ct", [
        "Adenocarcinoma_chest", "Large_cell_carcinoma_chest", "Squamous_cell_carcinoma_chest", "normal_chest",
    ]),
    _row("Head_CT", "ct", ["Normal_brain", "Brain_bleeding"]),
    _row("nerthus", "endoscopy", [
        "Cleanliness_Level_0", "Cleanliness_Level_1", "Cleanliness_Level_2", "Cleanliness_Level_3",
    ]),
]

# The synthetic demo: three imaging styles x four visible findings, drawn on
# first use (datasets/demo.py, which also says what each class shows). Labels
# are interleaved so that the base half (first six labels) and the new half
# both span every style; each half has three descriptive names and three
# code-like names that say nothing about the image.
DEMO = CatalogEntry(
    name="demo",
    modality="synthetic",
    classnames=(
        "Z5", "J2", "W4", "fundus_ring", "xray_streaks", "tissue_blob",
        "fundus_spots", "xray_ring", "Q3", "K7", "V9", "tissue_ring",
    ),
    dataset_dir="demo",
    image_subdir="images",
    generated=True,
)

# BiomedCoOp's benchmark (CVPR 2025; github.com/HealthX-Lab/BiomedCoOp): 11 datasets with their published
# splits and its layout, <root>/<folder>/<folder>/<class folder>/<image> with the split file
# <root>/<folder>/split_<folder>.json, so a copy of its data folder is used as it is. Class names
# in the split's label order (not alphabetical); every prompt is "a photo of a {class}.", as
# there. The names are the original's, except COVID_19_BiomedCoOp (folder COVID_19), since the
# name COVID_19 is this project's 4-class X-ray benchmark with another split and class names.
BIOMEDCOOP_BACKBONE = "biomedclip"


def _suite_row(name, modality, classnames, folder="", split_hint=""):
    folder = folder or name
    return CatalogEntry(name=name, modality=modality, classnames=tuple(classnames), dataset_dir=folder,
                        image_subdir=folder, template="a photo of a {}.", split_file=f"split_{folder}.json",
                        split_hint=split_hint, suite="biomedcoop", backbone=BIOMEDCOOP_BACKBONE)


BIOMEDCOOP = [
    _suite_row("BTMRI", "mri", ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]),
    _suite_row("BUSI", "ultrasound", ["benign tumor", "malignant tumor", "normal scan"]),
    _suite_row("CHMNIST", "pathology", [
        "adipose tissue", "complex stroma", "debris", "empty background", "immune cells",
        "normal mucosal glands", "simple stroma", "tumour epithelium",
    ]),
    _suite_row("COVID_19_BiomedCoOp", "xray",
               ["covid lungs", "lung opacity lungs", "viral pneumonia lungs", "normal lungs"], folder="COVID_19"),
    _suite_row("CTKidney", "ct", ["cyst kidney", "kidney stone", "kidney tumor", "normal kidney"]),
    _suite_row("DermaMNIST", "dermoscopy", [
        "actinic keratosis", "basal cell carcinoma", "benign keratosis", "dermatofibroma", "melanoma",
        "melanocytic nevus", "vascular lesion",
    ]),
    _suite_row("KneeXray", "xray", [
        "healthy knee", "doubtful osteoarthritis", "minimal osteoarthritis", "moderate osteoarthritis",
        "severe osteoarthritis",
    ]),
    _suite_row("Kvasir", "endoscopy", [
        "dyed lifted polyps", "dyed resection margins", "esophagitis", "normal cecum", "normal pylorus",
        "normal z line", "polyps", "ulcerative colitis",
    ]),
    _suite_row("LungColon", "pathology", [
        "colon adenocarcinoma", "colon benign tissue", "lung adenocarcinoma", "lung benign tissue",
        "lung squamous cell carcinoma",
    ]),
    # Its published split (MedMNIST's: 97477 / 10832 / 1000) is not in the original repository's
    # snapshot, so none is shipped; the label order is MedMNIST's.
    _suite_row("OCTMNIST", "oct", ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal OCT scan"],
               split_hint="copy the published split file split_OCTMNIST.json (in OCTMNIST.zip of "
                          "huggingface.co/datasets/TahaKoleilat/BiomedCoOp, or data/OCTMNIST/ of "
                          "github.com/HealthX-Lab/BiomedCoOp) to {path}"),
    _suite_row("RETINA", "fundus", ["diabetic retinopathy", "glaucoma", "cataract", "normal retina"]),
]

CATALOG = {entry.name: entry for entry in BENCHMARKS + BIOMEDCOOP + [DEMO]}


def _group(*modalities):
    return tuple(e.name for e in BENCHMARKS if e.modality in modalities)


# Modality groups usable wherever a dataset name is accepted by the scripts.
GROUPS = {m: _group(m) for m in sorted({e.modality for e in BENCHMARKS}) if m != "multi_eye"}
GROUPS["eye"] = _group(*EYE_MODALITIES)
GROUPS["all"] = tuple(e.name for e in BENCHMARKS)
# A suite is a group of its own (not part of "all" or the modality groups).
GROUPS["biomedcoop"] = tuple(e.name for e in BIOMEDCOOP)


def normalize_classname(name):
    """Key used to match class names across files: case, underscores and spacing ignored."""
    return " ".join(name.replace("_", " ").lower().split())


def readable_classname(name):
    """The class name as it appears in a prompt: underscores become spaces."""
    return " ".join(name.replace("_", " ").split())


# Datasets declared in data (datasets/declared.py) that this process has read, by name.
DECLARED = {}

_HOW_TO_DECLARE = (
    "a dataset of your own is declared by a dataset.yaml next to its data_split.json "
    "(python -m datasets.make_split --root DATA --folder NAME writes both)"
)


def known_names():
    return sorted(set(CATALOG) | set(DECLARED), key=str.lower)


def get_entry(name):
    if name in CATALOG:
        return CATALOG[name]
    if name in DECLARED:
        return DECLARED[name]
    raise KeyError(f"unknown dataset '{name}'; known datasets: {', '.join(known_names())}; {_HOW_TO_DECLARE}")


def default_backbone(names, fallback):
    """The backbone the sweeps use for these datasets when BACKBONE is not set: the one their rows
    name when they all name the same, else ``fallback``."""
    named = {CATALOG[n].backbone if n in CATALOG else "" for n in names}
    return named.pop() if len(named) == 1 and "" not in named else fallback


def resolve_target(target):
    """Dataset names for a dataset name, a modality group, or 'demo'. Raises KeyError if unknown."""
    if target in CATALOG or target in DECLARED:
        return [target]
    if target in GROUPS:
        return list(GROUPS[target])
    raise KeyError(
        f"unknown dataset or group '{target}'; groups: {', '.join(sorted(GROUPS))}; "
        f"datasets: {', '.join(known_names())}; {_HOW_TO_DECLARE}"
    )
