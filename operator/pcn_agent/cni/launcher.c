/*
 * pcn-cni's launcher: the binary the container runtime runs as the "pcn" CNI
 * plugin. It hands the whole invocation (its environment and the network
 * configuration from stdin) to the pcn agent on the node over the agent's
 * local API socket, and relays the agent's answer: stdout (the result or CNI
 * error JSON), stderr and the exit status.
 *
 * Why: a pod's ADD used to start a Python interpreter and import the plugin
 * (~15 ms of CPU per pod, ~1 s each with 30 pods at once on 2 CPUs); the
 * agent is already running and warm, and runs the same code
 * (pcn_agent.cni.commands.run_in_agent, served by
 * pcn_agent.control.localapi.CniService). The Python plugin stays the
 * reference implementation: both pass tests/test_cni.py.
 *
 * Protocol (one connection per invocation, see CniService):
 *   -> {"op":"cni","env":{"NAME":"value",...},"stdin":"<configuration>"}\n
 *   <- PCNCNI1 <status> <stdout bytes> <stderr bytes>\n<stdout><stderr>
 *
 * When the agent cannot take the invocation (no socket, connection refused,
 * permission denied, an agent that answers with a local API error line
 * because it does not know the "cni" op), the launcher execs the Python
 * plugin, <this executable>-python (install.py and the lab write it), with
 * the same environment and the configuration on stdin again: the agent-less
 * cases then behave exactly as the reference does (DEL still releases the
 * pod's link and address, STATUS answers 50, ADD fails with the error that
 * names the fix), from one implementation. That path is slow (an
 * interpreter start) but only taken when the agent is down.
 *
 * The socket path comes from the configuration's top-level "agentSocket"
 * (default /run/pcn/agent.sock), its connect timeout from "agentTimeout".
 * Only those keys and "cniVersion" are read here; everything else is checked
 * by the agent, with the plugin's code.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

extern char **environ;

#define DEFAULT_SOCKET "/run/pcn/agent.sock"
#define DEFAULT_VERSION "1.1.0"
#define FRAME "PCNCNI1 "
/* The agent's answer waits for IPAM (the plugin gives it 60 s) and the
 * attach (agentTimeout): past this the agent is stuck, not slow. */
#define ANSWER_TIMEOUT_S 120
#define CNI_MAX_INPUT (16u << 20)
#define CNI_TRY_AGAIN_LATER 11

struct buf {
	char *d;
	size_t n, cap;
};

static void buf_grow(struct buf *b, size_t more)
{
	if (b->n + more <= b->cap)
		return;
	size_t cap = b->cap ? b->cap : 4096;
	while (cap < b->n + more)
		cap *= 2;
	char *d = realloc(b->d, cap);
	if (!d) {
		/* no JSON can be built without memory either: the status says it */
		fputs("pcn-cni: out of memory\n", stderr);
		_exit(1);
	}
	b->d = d;
	b->cap = cap;
}

static void buf_add(struct buf *b, const char *s, size_t n)
{
	buf_grow(b, n);
	memcpy(b->d + b->n, s, n);
	b->n += n;
}

static void buf_str(struct buf *b, const char *s)
{
	buf_add(b, s, strlen(s));
}

/* s as a JSON string. Bytes >= 0x80 go through as they are: the agent
 * decodes the line as UTF-8 and refuses anything else (then the Python
 * plugin reads the input and says what is wrong with it). */
static void buf_json(struct buf *b, const char *s, size_t n)
{
	static const char hex[] = "0123456789abcdef";

	buf_add(b, "\"", 1);
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '"' || c == '\\') {
			char esc[2] = {'\\', (char)c};
			buf_add(b, esc, 2);
		} else if (c < 0x20) {
			char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
			buf_add(b, esc, 6);
		} else {
			buf_add(b, (const char *)&c, 1);
		}
	}
	buf_add(b, "\"", 1);
}

static int read_all(int fd, struct buf *b, size_t limit)
{
	for (;;) {
		buf_grow(b, 65536);
		ssize_t got = read(fd, b->d + b->n, b->cap - b->n);
		if (got < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (got == 0)
			return 0;
		b->n += (size_t)got;
		if (b->n > limit) {
			errno = EFBIG;
			return -1;
		}
	}
}

/* All of `n` bytes to `fd`: with send(MSG_NOSIGNAL) to the agent's socket
 * (`sock`), so that an agent that closed the connection is EPIPE and a CNI
 * error, not SIGPIPE and an exit without one; with write() to stdout and
 * stderr. */
static int put_all(int fd, const char *p, size_t n, int sock)
{
	while (n) {
		ssize_t put = sock ? send(fd, p, n, MSG_NOSIGNAL) : write(fd, p, n);
		if (put < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += put;
		n -= (size_t)put;
	}
	return 0;
}

/* ---------------------------------------------------------------- config
 * Just enough JSON to find three top-level keys; a configuration this
 * cannot walk is left to the Python plugin, which reports the error. */
static const char *json_ws(const char *p, const char *e)
{
	while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
		p++;
	return p;
}

static const char *json_string_end(const char *p, const char *e)
{
	for (p++; p < e; p++) {
		if (*p == '\\')
			p++;
		else if (*p == '"')
			return p + 1;
	}
	return NULL;
}

static const char *json_value_end(const char *p, const char *e)
{
	if (p >= e)
		return NULL;
	if (*p == '"')
		return json_string_end(p, e);
	if (*p == '{' || *p == '[') {
		int depth = 0;
		while (p < e) {
			if (*p == '"') {
				p = json_string_end(p, e);
				if (!p)
					return NULL;
				continue;
			}
			if (*p == '{' || *p == '[')
				depth++;
			else if (*p == '}' || *p == ']')
				if (--depth == 0)
					return p + 1;
			p++;
		}
		return NULL;
	}
	while (p < e && !strchr(",}] \t\r\n", *p))
		p++;
	return p;
}

struct conf {
	char socket[sizeof(((struct sockaddr_un *)0)->sun_path)];
	char version[16];
	double timeout_s;
};

/* A top-level string value without escapes, copied into out[size]. */
static int json_plain_string(const char *v, const char *end, char *out, size_t size)
{
	if (*v != '"' || (size_t)(end - v - 2) >= size || memchr(v, '\\', (size_t)(end - v)))
		return -1;
	memcpy(out, v + 1, (size_t)(end - v - 2));
	out[end - v - 2] = 0;
	return 0;
}

static int parse_conf(const char *p, size_t n, struct conf *c)
{
	const char *e = p + n;

	strcpy(c->socket, DEFAULT_SOCKET);
	strcpy(c->version, DEFAULT_VERSION);
	c->timeout_s = 10;
	p = json_ws(p, e);
	if (p >= e || *p++ != '{')
		return -1;
	for (;;) {
		p = json_ws(p, e);
		if (p < e && *p == '}')
			return 0;
		if (p >= e || *p != '"')
			return -1;
		const char *key = p + 1, *key_end = json_string_end(p, e);
		if (!key_end)
			return -1;
		size_t key_len = (size_t)(key_end - 1 - key);
		p = json_ws(key_end, e);
		if (p >= e || *p++ != ':')
			return -1;
		p = json_ws(p, e);
		const char *v = p, *v_end = json_value_end(p, e);
		if (!v_end)
			return -1;
#define KEY(name) (key_len == sizeof(name) - 1 && !memcmp(key, name, key_len))
		if (KEY("agentSocket")) {
			if (json_plain_string(v, v_end, c->socket, sizeof(c->socket)) || c->socket[0] != '/')
				return -1;
		} else if (KEY("cniVersion")) {
			if (json_plain_string(v, v_end, c->version, sizeof(c->version)))
				return -1;
		} else if (KEY("agentTimeout")) {
			char num[32], *num_end;
			if ((size_t)(v_end - v) >= sizeof(num))
				return -1;
			memcpy(num, v, (size_t)(v_end - v));
			num[v_end - v] = 0;
			c->timeout_s = strtod(num, &num_end);
			if (*num_end || !(c->timeout_s > 0))
				return -1;
		}
#undef KEY
		p = json_ws(v_end, e);
		if (p < e && *p == ',')
			p++;
		else if (p < e && *p == '}')
			return 0;
		else
			return -1;
	}
}

/* ---------------------------------------------------------------- answers */
static void fail(const char *version, int code, const char *details, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	struct buf out = {0};

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	buf_str(&out, "{\"cniVersion\": ");
	buf_json(&out, version, strlen(version));
	char num[32];
	snprintf(num, sizeof(num), ", \"code\": %d, \"msg\": ", code);
	buf_str(&out, num);
	buf_json(&out, msg, strlen(msg));
	if (details) {
		buf_str(&out, ", \"details\": ");
		buf_json(&out, details, strlen(details));
	}
	buf_str(&out, "}\n");
	put_all(1, out.d, out.n, 0);
	_exit(1);
}

/* Exec the Python plugin with the configuration on stdin again; returns
 * only if that is impossible, with errno set and what[] saying which step. */
static void exec_python(char **argv, const struct buf *input, char *what, size_t what_size)
{
	char self[PATH_MAX], plugin[PATH_MAX + 8];
	ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);

	if (n < 0) {
		snprintf(what, what_size, "readlink /proc/self/exe");
		return;
	}
	self[n] = 0;
	snprintf(plugin, sizeof(plugin), "%s-python", self);
	/* a memfd rather than a pipe: any size, no writer process to keep */
	int fd = memfd_create("pcn-cni-stdin", 0);
	if (fd < 0 || put_all(fd, input->d ? input->d : "", input->n, 0) || lseek(fd, 0, SEEK_SET) ||
	    dup2(fd, 0) < 0) {
		snprintf(what, what_size, "handing stdin on");
		return;
	}
	if (fd != 0)
		close(fd);
	argv[0] = plugin;
	execve(plugin, argv, environ);
	snprintf(what, what_size, "exec %s", plugin);
}

static void fall_back(char **argv, const struct buf *input, const struct conf *c, const char *why)
{
	char what[PATH_MAX + 64];
	int saved;

	exec_python(argv, input, what, sizeof(what));
	saved = errno;
	fail(c->version, CNI_TRY_AGAIN_LATER,
	     "pcn-cni hands each pod to the pcn agent on this node (agentSocket in the CNI "
	     "configuration) and runs its Python plugin, installed next to it as <plugin>-python, "
	     "only when the agent cannot take it; start the pcn agent (the pcn-agent DaemonSet "
	     "re-installs both)",
	     "the pcn agent is not reachable (%s) and the Python plugin cannot be run: %s: %s", why,
	     what, strerror(saved));
}

static int agent_connect(const struct conf *c, char *why, size_t why_size)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	struct timeval connect_tv = {.tv_sec = (time_t)c->timeout_s,
				     .tv_usec = (suseconds_t)((c->timeout_s - (time_t)c->timeout_s) * 1e6)};
	struct timeval answer_tv = {.tv_sec = ANSWER_TIMEOUT_S};
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0) {
		snprintf(why, why_size, "socket: %s", strerror(errno));
		return -1;
	}
	strcpy(addr.sun_path, c->socket);
	/* a unix connect waits on the send timeout when the listen backlog is full */
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &connect_tv, sizeof(connect_tv));
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &answer_tv, sizeof(answer_tv));
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		snprintf(why, why_size, "%s: %s", c->socket, strerror(errno));
		close(fd);
		return -1;
	}
	return fd;
}

int main(int argc, char **argv)
{
	struct buf input = {0}, req = {0}, ans = {0};
	struct conf c;
	char why[PATH_MAX + 256];
	const char *command = getenv("CNI_COMMAND");

	/* --help, or run by hand: the Python plugin explains itself */
	if (argc > 1 || !command || !*command || isatty(0)) {
		if (command && *command && !isatty(0) && read_all(0, &input, CNI_MAX_INPUT) < 0)
			input.n = 0;
		strcpy(c.version, DEFAULT_VERSION);
		fall_back(argv, &input, &c, "not a CNI invocation");
	}
	if (read_all(0, &input, CNI_MAX_INPUT) < 0)
		fail(DEFAULT_VERSION, 5, NULL, "reading the network configuration from stdin: %s",
		     strerror(errno));
	if (parse_conf(input.d ? input.d : "", input.n, &c) < 0) {
		strcpy(c.version, DEFAULT_VERSION);
		fall_back(argv, &input, &c, "the configuration needs the Python plugin's checks");
	}

	int fd = agent_connect(&c, why, sizeof(why));
	if (fd < 0)
		fall_back(argv, &input, &c, why);

	buf_str(&req, "{\"op\":\"cni\",\"env\":{");
	int first = 1;
	for (char **e = environ; *e; e++) {
		const char *eq = strchr(*e, '=');
		if (!eq)
			continue;
		if (!first)
			buf_add(&req, ",", 1);
		first = 0;
		buf_json(&req, *e, (size_t)(eq - *e));
		buf_add(&req, ":", 1);
		buf_json(&req, eq + 1, strlen(eq + 1));
	}
	buf_str(&req, "},\"stdin\":");
	buf_json(&req, input.d ? input.d : "", input.n);
	buf_str(&req, "}\n");
	if (put_all(fd, req.d, req.n, 1) < 0) {
		if (errno == EAGAIN || errno == EWOULDBLOCK)
			fail(c.version, CNI_TRY_AGAIN_LATER, "the agent is alive but stuck; check its log",
			     "the pcn agent at %s did not take the request within %g s", c.socket,
			     c.timeout_s);
		fail(c.version, CNI_TRY_AGAIN_LATER, "check the pcn agent's log",
		     "the pcn agent at %s dropped the connection: %s", c.socket, strerror(errno));
	}
	if (read_all(fd, &ans, CNI_MAX_INPUT) < 0) {
		if (errno == EAGAIN || errno == EWOULDBLOCK)
			fail(c.version, CNI_TRY_AGAIN_LATER,
			     "the agent is alive but stuck; check its log (the runtime retries)",
			     "the pcn agent at %s did not answer %s within %d s", c.socket, command,
			     ANSWER_TIMEOUT_S);
		fail(c.version, CNI_TRY_AGAIN_LATER, "check the pcn agent's log",
		     "reading the pcn agent's answer from %s: %s", c.socket, strerror(errno));
	}
	close(fd);
	if (ans.n && ans.d[0] == '{') {
		/* a local API error line: the op was refused before anything was
		 * done (an agent without the "cni" op, a peer it does not serve) */
		fall_back(argv, &input, &c, "the agent does not run CNI invocations itself");
	}
	int status, head = 0;
	size_t out_n = 0, err_n = 0, start = sizeof(FRAME) - 1;
	buf_add(&ans, "", 1); /* a NUL after the answer for sscanf, not counted */
	ans.n--;
	if (ans.n < start || memcmp(ans.d, FRAME, start) ||
	    sscanf(ans.d + start, "%d %zu %zu\n%n", &status, &out_n, &err_n, &head) != 3 || !head ||
	    start + (size_t)head + out_n + err_n != ans.n)
		fail(c.version, CNI_TRY_AGAIN_LATER,
		     "the agent may have failed in the middle of the command; check its log (the "
		     "runtime retries, and deletes what a failed ADD left)",
		     "the pcn agent at %s closed the connection without a complete answer to %s",
		     c.socket, command);
	const char *body = ans.d + start + (size_t)head;
	put_all(1, body, out_n, 0);
	put_all(2, body + out_n, err_n, 0);
	return status;
}
