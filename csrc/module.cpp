// The CPU extension mirai_kernels._C. It exposes no Python functions: importing it runs the static
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL registrations of every csrc/*.cpp, which add the *_cpp ops to
// torch.ops.mirai. A bare module init avoids pybind11 (and its compile time).
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mirai_kernels C++ CPU ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
