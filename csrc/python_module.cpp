// The importable extension module liif_cuda._C. Importing it loads the shared library, whose static
// initialisers register the operator schema and kernels with PyTorch's dispatcher. It also reports how
// the library was built.
#include <Python.h>

// LIIF_WITH_CUDA, LIIF_WGMMA_BUILT and LIIF_CUDA_ARCHS, written by setup.py.
#include "liif_build_config.h"
#include "cpu/bf16_linear.h"

static PyObject* build_info(PyObject*, PyObject*) {
#ifdef LIIF_WITH_CUDA
  PyObject* cuda = Py_True;
#else
  PyObject* cuda = Py_False;
#endif
#ifdef LIIF_WGMMA_BUILT
  PyObject* wgmma = Py_True;
#else
  PyObject* wgmma = Py_False;
#endif
  PyObject* cpu_bf16 = liif::cpu::bf16::native_available() ? Py_True : Py_False;
  return Py_BuildValue("{s:O,s:s,s:O,s:O}", "cuda", cuda, "cuda_archs", LIIF_CUDA_ARCHS,
                       "cuda_wgmma", wgmma, "cpu_bf16", cpu_bf16);
}

static PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "dict(cuda=bool, cuda_archs=str, cuda_wgmma=bool, cpu_bf16=bool): whether CUDA kernels were "
     "compiled, for which targets, whether H100 / H200 GPUs run the wgmma kernel's sm_90a code, "
     "and whether precision 'bf16' runs bf16 kernels on this CPU."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods, nullptr, nullptr, nullptr, nullptr};

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
