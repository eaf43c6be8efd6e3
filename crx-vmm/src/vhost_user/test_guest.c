/* Guest side of vhost_user::vsock's QEMU test (built static, run as the initramfs's
 * only program): connect to host port 1025 and exchange a line, then echo
 * everything received on vsock port 1024 until the host half-closes. */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(void) {
    char buf[65536];
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = 2, .svm_port = 1025};
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) { perror("GUEST connect 1025"); }
    else {
        const char *m = "guest-hello\n";
        write(s, m, strlen(m));
        ssize_t n = read(s, buf, sizeof buf - 1);
        if (n > 0) { buf[n] = 0; printf("GUEST got from host: %s", buf); }
        close(s);
    }
    int l = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm la = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = 1024};
    if (bind(l, (struct sockaddr *)&la, sizeof la) || listen(l, 4)) { perror("GUEST listen"); return 1; }
    printf("GUEST listening on 1024\n"); fflush(stdout);
    int c = accept(l, NULL, NULL);
    long total = 0;
    for (;;) {
        ssize_t n = read(c, buf, sizeof buf);
        if (n <= 0) break;
        total += n;
        for (ssize_t off = 0; off < n;) { ssize_t w = write(c, buf + off, n - off); if (w <= 0) goto out; off += w; }
    }
out:
    printf("GUEST echo done, %ld bytes\n", total); fflush(stdout);
    close(c);
    return 0;
}
