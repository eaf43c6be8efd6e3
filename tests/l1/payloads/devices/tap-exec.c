/* tap-exec NAME FD PROGRAM [ARGS...]: creates tap NAME (IFF_TAP | IFF_NO_PI |
 * IFF_VNET_HDR, what crx-vmm's --net expects), puts its fd at FD without
 * close-on-exec and execs PROGRAM, which inherits it (e.g. crx-vmm --net fd=FD,...).
 * The tap lives as long as that fd: it vanishes when PROGRAM ends. Busybox cannot do
 * TUNSETIFF, so the devices lane builds this with `gcc -static`; never committed as a
 * binary. */
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: tap-exec NAME FD PROGRAM [ARGS...]\n");
        return 2;
    }
    int want = atoi(argv[2]);
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        perror("tap-exec: open /dev/net/tun (is the tun module loaded?)");
        return 1;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    strncpy(ifr.ifr_name, argv[1], IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        perror("tap-exec: TUNSETIFF");
        return 1;
    }
    if (fd != want) {
        if (dup2(fd, want) < 0) {
            perror("tap-exec: dup2");
            return 1;
        }
        close(fd);
    } else {
        fcntl(fd, F_SETFD, 0);
    }
    execv(argv[3], argv + 3);
    perror("tap-exec: exec");
    return 127;
}
