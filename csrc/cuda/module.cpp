// The CUDA extension mirai_kernels._C_cuda: importing it registers the CUDA kernels (backend "cuda",
// csrc/cuda/*.cu) of the torch.ops.mirai ops whose schemas mirai_kernels/ops/<op>.py declares. Built only when CUDA
// is usable or forced (MIRAI_CUDA=1, see setup.py).
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", "mirai_kernels CUDA ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
