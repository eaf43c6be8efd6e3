/*
 * kvm-check: proves a /dev/kvm can run a guest, from inside the nested-KVM rig's L1.
 *
 * Opens /dev/kvm, checks KVM_GET_API_VERSION == 12, then runs a 9-byte real-mode guest
 * that writes to an I/O port N times and halts, and checks KVM delivered exactly those
 * exits. Prints one `CRX-L1-RESULT {json}` line with the figures (µs per exit under the
 * L1's emulated SVM) and exits 0 only if everything held.
 *
 * Compiled at test time with `gcc -static` into the payload (tests/src/l1.rs); no binary
 * is committed. Usage: kvm-check [iterations]
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define GUEST_MEM_SIZE 0x10000
#define CODE_ADDR 0x1000
#define PORT 0x10

static int fail(const char *what)
{
    int err = errno;
    printf("CRX-L1-RESULT {\"check\":\"kvm\",\"ok\":false,\"error\":\"%s: %s\"}\n", what,
           err ? strerror(err) : "unexpected");
    fprintf(stderr, "kvm-check: %s: %s\n", what, err ? strerror(err) : "unexpected");
    return 1;
}

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

int main(int argc, char **argv)
{
    long iterations = argc > 1 ? strtol(argv[1], NULL, 10) : 1000;
    if (iterations < 1 || iterations > 0xffff) {
        fprintf(stderr, "kvm-check: iterations must be 1..65535\n");
        return 2;
    }

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        return fail("open /dev/kvm");
    errno = 0;
    int api = ioctl(kvm, KVM_GET_API_VERSION, 0);
    if (api != 12) {
        printf("CRX-L1-RESULT {\"check\":\"kvm\",\"ok\":false,\"api_version\":%d}\n", api);
        return 1;
    }

    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        return fail("KVM_CREATE_VM");
    uint8_t *mem = mmap(NULL, GUEST_MEM_SIZE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return fail("mmap guest memory");

    /* mov cx, N ; l: out PORT, al ; loop l ; hlt */
    const uint8_t code[] = {
        0xb9, (uint8_t)(iterations & 0xff), (uint8_t)(iterations >> 8),
        0xe6, PORT,
        0xe2, 0xfc,
        0xf4,
    };
    memcpy(mem + CODE_ADDR, code, sizeof(code));

    struct kvm_userspace_memory_region region = {
        .slot = 0,
        .guest_phys_addr = 0,
        .memory_size = GUEST_MEM_SIZE,
        .userspace_addr = (uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        return fail("KVM_SET_USER_MEMORY_REGION");

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        return fail("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < (int)sizeof(struct kvm_run))
        return fail("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        return fail("mmap kvm_run");

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        return fail("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        return fail("KVM_SET_SREGS");
    struct kvm_regs regs = { .rip = CODE_ADDR, .rflags = 0x2, .rax = 0x42 };
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        return fail("KVM_SET_REGS");

    long io_exits = 0;
    double start = now_us();
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            return fail("KVM_RUN");
        }
        if (run->exit_reason == KVM_EXIT_IO) {
            uint8_t value = *((uint8_t *)run + run->io.data_offset);
            if (run->io.direction != KVM_EXIT_IO_OUT || run->io.port != PORT || value != 0x42) {
                errno = 0;
                return fail("unexpected I/O exit");
            }
            io_exits++;
            continue;
        }
        if (run->exit_reason == KVM_EXIT_HLT)
            break;
        printf("CRX-L1-RESULT {\"check\":\"kvm\",\"ok\":false,\"exit_reason\":%u}\n",
               run->exit_reason);
        return 1;
    }
    double elapsed = now_us() - start;

    int ok = io_exits == iterations;
    printf("CRX-L1-RESULT {\"check\":\"kvm\",\"ok\":%s,\"api_version\":%d,\"io_exits\":%ld,"
           "\"expected_io_exits\":%ld,\"us_per_exit\":%.1f}\n",
           ok ? "true" : "false", api, io_exits, iterations, elapsed / (double)(io_exits + 1));
    return ok ? 0 : 1;
}
