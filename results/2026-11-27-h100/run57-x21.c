#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
typedef int (*memcpy_fn)(void*, const void*, size_t, int, void*);
typedef int (*record_fn)(void*, void*);
typedef int (*query_fn)(void*);
static PyObject* getbufs(PyObject* self, PyObject* args){
    PyObject *seq; int flags;
    if(!PyArg_ParseTuple(args,"Oi",&seq,&flags)) return NULL;
    PyObject *fast=PySequence_Fast(seq,"x"); Py_ssize_t n=PySequence_Fast_GET_SIZE(fast);
    for(Py_ssize_t k=0;k<n;k++){ Py_buffer v; if(PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast,k),&v,flags)) {Py_DECREF(fast);return NULL;} PyBuffer_Release(&v);}
    Py_DECREF(fast); Py_RETURN_NONE;
}
static PyObject* copy(PyObject* self, PyObject* args){
    unsigned long long f,d,s,n,st;
    if(!PyArg_ParseTuple(args,"KKKKK",&f,&d,&s,&n,&st)) return NULL;
    int r=((memcpy_fn)(uintptr_t)f)((void*)(uintptr_t)d,(const void*)(uintptr_t)s,(size_t)n,1,(void*)(uintptr_t)st);
    return PyLong_FromLong(r);
}
static PyObject* copy_record(PyObject* self, PyObject* const* a, Py_ssize_t na){
    /* f, d, s, n, st, rec, ev */
    uintptr_t v[7];
    for(int i=0;i<7;i++){ v[i]=(uintptr_t)PyLong_AsUnsignedLongLong(a[i]); }
    if(PyErr_Occurred()) return NULL;
    int r=((memcpy_fn)v[0])((void*)v[1],(const void*)v[2],(size_t)v[3],1,(void*)v[4]);
    if(!r) r=((record_fn)v[5])((void*)v[6],(void*)v[4]);
    return PyLong_FromLong(r);
}
static PyObject* query(PyObject* self, PyObject* args){
    unsigned long long f,e;
    if(!PyArg_ParseTuple(args,"KK",&f,&e)) return NULL;
    return PyLong_FromLong(((query_fn)(uintptr_t)f)((void*)(uintptr_t)e));
}
static PyMethodDef M[]={{"getbufs",getbufs,METH_VARARGS,""},{"copy",copy,METH_VARARGS,""},
 {"copy_record",(PyCFunction)(void(*)(void))copy_record,METH_FASTCALL,""},{"query",query,METH_VARARGS,""},{0}};
static struct PyModuleDef D={PyModuleDef_HEAD_INIT,"x21",0,-1,M};
PyMODINIT_FUNC PyInit_x21(void){return PyModule_Create(&D);}
