/*
 * kvm-hold: keeps one idle KVM vCPU alive in the nested-KVM rig's L1 for the whole run,
 * its local APIC in the kernel and disabled (in hardware and in software).
 *
 * Why: L1's KVM gates its interrupt paths on two static keys (apic_hw_disabled,
 * apic_sw_disabled) that count the vCPUs whose APIC is disabled. Every L2 boot moves
 * those counts between 0 and 1, and each move rewrites L1's kernel text (int3 first,
 * then the new bytes) while L1's other vCPU may be running that very code, e.g.
 * __apic_accept_irq. Under QEMU's multi-threaded TCG such a cross-modification has
 * been caught leaving a vCPU spinning on the int3 for good (one stall in ~250 lane runs,
 * L1 silent until the host kills it). With this vCPU holding both counts at 1 or more,
 * L2 boots never flip the keys and the text is never patched for them.
 *
 * Run by L1's /init once /dev/kvm exists: sets everything up in the foreground (exit 0
 * only if it all held), then leaves a child that owns the VM and sleeps until L1 powers
 * off. Built by run.sh with `gcc -static` into L1's base initramfs.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define MSR_IA32_APICBASE 0x1b
/* The default base address with the ENABLE bit (11) clear: the APIC disabled. */
#define APICBASE_DISABLED 0xfee00000ULL

static int fail(const char *what)
{
    fprintf(stderr, "kvm-hold: %s: %s\n", what, strerror(errno));
    return 1;
}

int main(void)
{
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        return fail("open /dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        return fail("KVM_CREATE_VM");
    /* The in-kernel irqchip gives the vCPU a kernel local APIC, created sw-disabled. */
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
        return fail("KVM_CREATE_IRQCHIP");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        return fail("KVM_CREATE_VCPU");
    struct {
        struct kvm_msrs header;
        struct kvm_msr_entry entry;
    } msrs;
    memset(&msrs, 0, sizeof(msrs));
    msrs.header.nmsrs = 1;
    msrs.entry.index = MSR_IA32_APICBASE;
    msrs.entry.data = APICBASE_DISABLED;
    /* KVM_SET_MSRS returns how many MSRs it set. */
    if (ioctl(vcpu, KVM_SET_MSRS, &msrs) != 1)
        return fail("KVM_SET_MSRS APIC base (hardware-disable the APIC)");
    pid_t child = fork();
    if (child < 0)
        return fail("fork");
    if (child > 0)
        return 0;
    /* The child owns the VM from here; L1's power-off ends it. Its stdio goes to
     * /dev/null so a caller reading our output (init's $(...)) sees it end now. */
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        if (null > 2)
            close(null);
    }
    setsid();
    signal(SIGHUP, SIG_IGN);
    for (;;)
        pause();
}
