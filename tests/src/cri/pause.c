/*
 * The pause program of crx's test pause image (tests/src/cri/images.rs builds it with
 * `musl-gcc -static`, or `gcc -static`, into an OCI image of one file).
 *
 * It holds the pod's namespaces open and does nothing else: it waits for signals,
 * reaps children re-parented to it (it is PID 1 of a pod that shares its PID
 * namespace), and exits 0 on SIGINT or SIGTERM so that StopPodSandbox is quick.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig)
{
	(void)sig;
	_exit(0);
}

static void reap(int sig)
{
	(void)sig;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
}

static int on(int sig, void (*handler)(int))
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = handler;
	sigemptyset(&sa.sa_mask);
	/* SA_NOCLDSTOP: a stopped child is not a child to reap. */
	sa.sa_flags = sig == SIGCHLD ? SA_NOCLDSTOP | SA_RESTART : SA_RESTART;
	return sigaction(sig, &sa, NULL);
}

int main(int argc, char **argv)
{
	(void)argv;
	if (argc != 1) {
		fprintf(stderr, "pause: takes no arguments\n");
		return 2;
	}
	if (on(SIGINT, stop) || on(SIGTERM, stop) || on(SIGCHLD, reap)) {
		perror("pause: sigaction");
		return 1;
	}
	for (;;)
		pause();
}
