"""amalgam: one light student learns many heterogeneous teachers' tasks from unlabeled images."""

from amalgam import models  # noqa: F401  (registers amalgam_* timm models)
from amalgam.backbones import Features, TappedNetwork, build_model, load_weights, read_state_dict
from amalgam.classifier import Classifier
from amalgam.common_feature import CommonFeatureBlock, CommonFeatures
from amalgam.export import Student, export_student, load_student
from amalgam.losses import MultiBandwidthMMD, ReconstructionLoss, SoftTargetKD
from amalgam.module import AmalgamationModule, StudentConfig
from amalgam.teacher import Teacher, TeacherConfig

__all__ = [
    "AmalgamationModule", "Classifier", "CommonFeatureBlock", "CommonFeatures", "Features",
    "MultiBandwidthMMD", "ReconstructionLoss", "SoftTargetKD", "Student", "StudentConfig", "TappedNetwork",
    "Teacher", "TeacherConfig", "build_model", "export_student", "load_student", "load_weights", "read_state_dict",
]
__version__ = "0.1.0"
