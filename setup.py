"""Package metadata comes from settings.ini (nbdev 2 convention); extras hold the research stack."""
from configparser import ConfigParser
from pathlib import Path
import setuptools

config = ConfigParser(delimiters=['='])
config.read(Path(__file__).parent / 'settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

# Core modules import only these (they are also on the GPU image, where the project installs with --no-deps).
requirements = cfg.get('requirements', '').split()
# Everything else the workbench uses: notebooks, papermill reports, widgets, tests, benchmarks.
dev_requirements = """triton nbdev execnb fastcore ghapi jupyterlab ipykernel ipywidgets anywidget plotly matplotlib
papermill nbformat nbclient nbconvert pytest pytest-xdist hypothesis tensorboard pandas playwright psutil bokeh
statsmodels lifelines peft""".split()

setuptools.setup(
    name=cfg['lib_name'],
    version=cfg['version'],
    description=cfg['description'],
    author=cfg['author'],
    author_email=cfg['author_email'],
    license='Apache-2.0',
    packages=setuptools.find_packages(include=['so8lab', 'so8lab.*']),
    include_package_data=True,
    python_requires=f">={cfg['min_python']}",
    install_requires=requirements,
    extras_require={'dev': dev_requirements},
    entry_points={'console_scripts': [s for s in cfg.get('console_scripts', '').split() if s],
                  'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False,
)
