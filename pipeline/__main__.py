import gc

from pipeline.cli import main

try:
    raise SystemExit(main())
finally:
    # The command is over and its exit status decided; the exit handlers (MLflow's among them) still
    # run. What is left is the interpreter's last garbage collections over everything TensorFlow,
    # Keras and MLflow built: 1.7-1.9 s after every command that loaded a model, measured. Objects
    # still alive then are freed with the process (Python never promised their __del__ at exit).
    gc.freeze()
