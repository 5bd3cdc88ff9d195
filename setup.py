from glob import glob

from setuptools import find_packages, setup

package_name = "reloc_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*", "bench"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*")),
        # `ros2 run` and launch_ros Node(package=, executable=) run <prefix>/lib/<pkg>/<exe>.
        # colcon puts the console scripts there (setup.cfg); pip only puts them in bin/, so the
        # executables also ship as data files (shell wrappers, mode 755; same entry points).
        ("lib/" + package_name, ["scripts/reloc_node", "scripts/reloc_lifecycle_node"]),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="reloc_ros developers",
    maintainer_email="dev@reloc-ros.invalid",
    description="Visual relocalization against a prior keyframe map: FAISS retrieval, "
    "geometric and learned (Reloc3r, Reloc-VGGT) pose estimation, motion averaging, ROS 2 node.",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "reloc-map = reloc_ros.cli.map_cli:main",
            "reloc-eval = reloc_ros.cli.eval_cli:main",
            "reloc-model = reloc_ros.cli.model_cli:main",
            "reloc-train = reloc_ros.cli.train_cli:main",
            "reloc_node = reloc_ros.ros.node:main",
            "reloc_lifecycle_node = reloc_ros.ros.lifecycle_node:main",
            "reloc-demo = reloc_ros.demo.run:main",
            "reloc-replay = reloc_ros.ros.bag_replay:main",
        ],
    },
)
