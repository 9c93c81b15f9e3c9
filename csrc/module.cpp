// The CPU extension mirai_kernels._C. It exposes no Python functions: importing it runs the static
// TORCH_LIBRARY_IMPL(mirai, CPU, ...) registrations of every csrc/*.cpp, which add the CPU kernels (backend "cpp")
// of the torch.ops.mirai ops whose schemas mirai_kernels/ops/<op>.py declares (mirai_kernels/ops/_registry.py).
// A bare module init avoids pybind11 (and its compile time).
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mirai_kernels C++ CPU ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
