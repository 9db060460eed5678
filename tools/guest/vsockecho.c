/*
 * vsockecho: AF_VSOCK stream test tool for the stratopy guest (busybox has
 * none).  Installed in the rootfs as /usr/bin/vsockecho (static, glibc).
 *
 *   vsockecho listen PORT
 *       accept connections on PORT, one at a time, and echo every byte back
 *       until the peer closes; prints "listening PORT" once ready.
 *   vsockecho connect CID PORT MSG
 *       connect to CID:PORT, send MSG, half-close, print everything the
 *       peer sends back until it closes.
 *   vsockecho send CID PORT BYTES
 *       connect, send BYTES bytes of the pattern (i * 7 + 3) & 0xff, close;
 *       prints "sent BYTES".
 * Exit status: 0 ok, 1 a system call failed (named on stderr), 2 usage.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int fail(const char *what)
{
    fprintf(stderr, "vsockecho: %s: %s\n", what, strerror(errno));
    return 1;
}

static int write_all(int fd, const char *buf, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += w;
        n -= (size_t)w;
    }
    return 0;
}

static int vsock_connect(unsigned cid, unsigned port)
{
    struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
        return -1;
    return fd;
}

static int do_listen(unsigned port)
{
    struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
    char buf[65536];
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        return fail("socket");
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0)
        return fail("bind");
    if (listen(s, 4) < 0)
        return fail("listen");
    printf("listening %u\n", port);
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR)
                continue;
            return fail("accept");
        }
        for (;;) {
            ssize_t n = read(c, buf, sizeof buf);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break;
            if (write_all(c, buf, (size_t)n) < 0)
                break;
        }
        close(c);
    }
}

static int do_connect(unsigned cid, unsigned port, const char *msg)
{
    char buf[4096];
    int fd = vsock_connect(cid, port);
    if (fd < 0)
        return fail("connect");
    if (write_all(fd, msg, strlen(msg)) < 0)
        return fail("write");
    shutdown(fd, SHUT_WR);
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return fail("read");
        if (n == 0)
            break;
        fwrite(buf, 1, (size_t)n, stdout);
    }
    printf("\n");
    close(fd);
    return 0;
}

static int do_send(unsigned cid, unsigned port, unsigned long total)
{
    char buf[8192];
    unsigned long i = 0;
    int fd = vsock_connect(cid, port);
    if (fd < 0)
        return fail("connect");
    while (i < total) {
        size_t n = 0;
        while (n < sizeof buf && i < total)
            buf[n++] = (char)((i++ * 7 + 3) & 0xff);
        if (write_all(fd, buf, n) < 0)
            return fail("write");
    }
    close(fd);
    printf("sent %lu\n", total);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && !strcmp(argv[1], "listen"))
        return do_listen((unsigned)strtoul(argv[2], NULL, 10));
    if (argc == 5 && !strcmp(argv[1], "connect"))
        return do_connect((unsigned)strtoul(argv[2], NULL, 10),
                          (unsigned)strtoul(argv[3], NULL, 10), argv[4]);
    if (argc == 5 && !strcmp(argv[1], "send"))
        return do_send((unsigned)strtoul(argv[2], NULL, 10),
                       (unsigned)strtoul(argv[3], NULL, 10), strtoul(argv[4], NULL, 10));
    fprintf(stderr, "usage: vsockecho listen PORT | connect CID PORT MSG | send CID PORT BYTES\n");
    return 2;
}
