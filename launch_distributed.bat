@echo off
rem Start the ComfyUI-Distributed master and workers: launch_distributed.bat --help
rem All the logic is in distributed_core\launcher.py; this only picks the Python to run it with:
rem the active virtual environment's, else ComfyUI portable's embedded one, else python on PATH.
setlocal
set "PYTHON=python"
if exist "%~dp0..\..\..\python_embeded\python.exe" set "PYTHON=%~dp0..\..\..\python_embeded\python.exe"
if defined VIRTUAL_ENV set "PYTHON=%VIRTUAL_ENV%\Scripts\python.exe"
rem By path rather than with -m: the embedded Python ignores the current folder, so -m would not find
rem the package; this also keeps relative paths in the arguments meaning what they mean here.
"%PYTHON%" "%~dp0distributed_core\launcher.py" %*
exit /b %ERRORLEVEL%
