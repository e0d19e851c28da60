// The importable extension module liif_cuda._C. Importing it loads the shared library, whose static
// initialisers register the operator schema and kernels with PyTorch's dispatcher. It also reports how
// the library was built.
#include <Python.h>

// LIIF_WITH_CUDA and LIIF_CUDA_ARCHS, written by setup.py.
#include "liif_build_config.h"

static PyObject* build_info(PyObject*, PyObject*) {
#ifdef LIIF_WITH_CUDA
  PyObject* cuda = Py_True;
#else
  PyObject* cuda = Py_False;
#endif
  return Py_BuildValue("{s:O,s:s}", "cuda", cuda, "cuda_archs", LIIF_CUDA_ARCHS);
}

static PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "dict(cuda=bool, cuda_archs=str): whether CUDA kernels were compiled, and for which targets."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods, nullptr, nullptr, nullptr, nullptr};

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
