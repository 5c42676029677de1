# JupyterLab for the study (`make lab` passes this file with --config): notebooks open in the kernel
# "Python (diffpath)", and saving one (autosave included) writes it as committed, without outputs,
# execution counts or session metadata, so running a notebook never changes the study's files
# (diffpath/study/lab.py says why a save hook rather than nbstripout or jupytext pairing).
c = get_config()  # noqa: F821
c.FileContentsManager.pre_save_hook = "diffpath.study.lab.strip_on_save"
c.MultiKernelManager.default_kernel_name = "diffpath"
