/* Many UDP datagrams per system call (recvmmsg/sendmmsg) for the DNS listener.

   recv(fd, count) -> [(data, address), ...]: up to `count` datagrams waiting on a non-blocking
   socket, [] when none waits. `address` is the sender's socket address as raw bytes (a
   struct sockaddr), handed back to send() as is.
   send(fd, messages, start) -> int: sends messages[start:] (each (data, address)) and returns
   the index of the first message not sent because the socket's buffer is full (len(messages)
   when all went). A message the kernel refuses for another reason is skipped, as a lost
   datagram would be.

   Each datagram gets a 64 KiB buffer, so nothing a client can send is cut short. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <netinet/in.h>

#define MAX_BATCH 64
#define DATAGRAM 65536

static char *buffers;  /* MAX_BATCH datagrams, allocated on first use */
static struct mmsghdr headers[MAX_BATCH];
static struct iovec vectors[MAX_BATCH];
static struct sockaddr_storage names[MAX_BATCH];

static PyObject *
batch_recv(PyObject *Py_UNUSED(self), PyObject *args)
{
    int fd, count, got, i;
    if (!PyArg_ParseTuple(args, "ii", &fd, &count))
        return NULL;
    if (count < 1 || count > MAX_BATCH) {
        PyErr_Format(PyExc_ValueError, "count must be 1 to %d", MAX_BATCH);
        return NULL;
    }
    if (buffers == NULL) {
        buffers = PyMem_RawMalloc((size_t)MAX_BATCH * DATAGRAM);
        if (buffers == NULL)
            return PyErr_NoMemory();
    }
    for (i = 0; i < count; i++) {
        vectors[i].iov_base = buffers + (size_t)i * DATAGRAM;
        vectors[i].iov_len = DATAGRAM;
        headers[i].msg_hdr.msg_name = &names[i];
        headers[i].msg_hdr.msg_namelen = sizeof(names[i]);
        headers[i].msg_hdr.msg_iov = &vectors[i];
        headers[i].msg_hdr.msg_iovlen = 1;
        headers[i].msg_hdr.msg_control = NULL;
        headers[i].msg_hdr.msg_controllen = 0;
        headers[i].msg_hdr.msg_flags = 0;
        headers[i].msg_len = 0;
    }
    do {
        got = recvmmsg(fd, headers, (unsigned int)count, MSG_DONTWAIT, NULL);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return PyList_New(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *out = PyList_New(got);
    if (out == NULL)
        return NULL;
    for (i = 0; i < got; i++) {
        PyObject *item = Py_BuildValue(
            "(y#y#)", (char *)vectors[i].iov_base, (Py_ssize_t)headers[i].msg_len,
            (char *)&names[i], (Py_ssize_t)headers[i].msg_hdr.msg_namelen);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

static PyObject *
batch_send(PyObject *Py_UNUSED(self), PyObject *args)
{
    int fd, sent, n;
    Py_ssize_t start, total;
    PyObject *messages;
    if (!PyArg_ParseTuple(args, "iO!n", &fd, &PyList_Type, &messages, &start))
        return NULL;
    total = PyList_GET_SIZE(messages);
    if (start < 0 || start > total) {
        PyErr_SetString(PyExc_IndexError, "start out of range");
        return NULL;
    }
    while (start < total) {
        n = 0;
        for (; n < MAX_BATCH && start + n < total; n++) {
            PyObject *item = PyList_GET_ITEM(messages, start + n);
            PyObject *data, *name;
            if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2
                || !PyBytes_Check(data = PyTuple_GET_ITEM(item, 0))
                || !PyBytes_Check(name = PyTuple_GET_ITEM(item, 1))
                || PyBytes_GET_SIZE(name) > (Py_ssize_t)sizeof(struct sockaddr_storage)) {
                PyErr_SetString(PyExc_TypeError, "messages must be (bytes, address) tuples");
                return NULL;
            }
            vectors[n].iov_base = PyBytes_AS_STRING(data);
            vectors[n].iov_len = (size_t)PyBytes_GET_SIZE(data);
            headers[n].msg_hdr.msg_name = PyBytes_AS_STRING(name);
            headers[n].msg_hdr.msg_namelen = (socklen_t)PyBytes_GET_SIZE(name);
            headers[n].msg_hdr.msg_iov = &vectors[n];
            headers[n].msg_hdr.msg_iovlen = 1;
            headers[n].msg_hdr.msg_control = NULL;
            headers[n].msg_hdr.msg_controllen = 0;
            headers[n].msg_hdr.msg_flags = 0;
        }
        do {
            sent = sendmmsg(fd, headers, (unsigned int)n, MSG_DONTWAIT);
        } while (sent < 0 && errno == EINTR);
        if (sent < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)
                break;
            sent = 1;  /* the first message was refused (unreachable, too big): skip it */
        }
        start += sent;
    }
    return PyLong_FromSsize_t(start);
}

static PyMethodDef methods[] = {
    {"recv", batch_recv, METH_VARARGS, "recv(fd, count) -> [(data, address), ...]"},
    {"send", batch_send, METH_VARARGS, "send(fd, messages, start) -> index of the first unsent"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_batch", "recvmmsg/sendmmsg for the DNS listener", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__batch(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "MAX_BATCH", MAX_BATCH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
