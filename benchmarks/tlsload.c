// tlsload: one load process of tls_bench.py, C + OpenSSL, blocking sockets.
// usage: tlsload echo|handshake HOST PORT SIZE CONNS SECONDS
// Sets up (echo: CONNS TLS connections), prints "ready", waits for "go" on
// stdin, runs for SECONDS, prints "ops=N errors=E seconds=S".
//   echo:      every connection sends SIZE bytes, then every one reads its
//              SIZE bytes back (checked); repeat.
//   handshake: connect, full TLS handshake (no session reuse), send SIZE
//              bytes, read them back, close; repeat.
// The server is measured, not the client: certificates are not verified.
// Build: gcc -O2 -o tlsload tlsload.c -lssl -lcrypto
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static struct sockaddr_in addr;

static SSL *open_tls(SSL_CTX *ctx) {
  int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  if (fd < 0) return NULL;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
    close(fd);
    return NULL;
  }
  SSL *ssl = SSL_new(ctx);
  SSL_set_fd(ssl, fd);
  if (SSL_connect(ssl) != 1) {
    SSL_free(ssl);
    close(fd);
    return NULL;
  }
  return ssl;
}

static void close_tls(SSL *ssl) {
  int fd = SSL_get_fd(ssl);
  SSL_shutdown(ssl);  // close_notify, as a polite client sends
  SSL_free(ssl);
  close(fd);
}

static int read_exactly(SSL *ssl, char *buf, int size) {
  int got = 0;
  while (got < size) {
    int r = SSL_read(ssl, buf + got, size - got);
    if (r <= 0) return -1;
    got += r;
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 7) {
    fprintf(stderr, "usage: tlsload echo|handshake HOST PORT SIZE CONNS SECONDS\n");
    return 2;
  }
  int echo = strcmp(argv[1], "echo") == 0;
  int size = atoi(argv[4]), conns = atoi(argv[5]);
  double seconds = atof(argv[6]);
  addr.sin_family = AF_INET;
  addr.sin_port = htons(atoi(argv[3]));
  inet_pton(AF_INET, argv[2], &addr.sin_addr);
  SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
  SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);  // a full handshake every time
  char *payload = malloc(size), *back = malloc(size);
  for (int i = 0; i < size; i++) payload[i] = (char)(i % 251);
  SSL **socks = calloc(conns > 0 ? conns : 1, sizeof(SSL *));
  if (echo)
    for (int i = 0; i < conns; i++)
      if (!(socks[i] = open_tls(ctx))) {
        fprintf(stderr, "tlsload: cannot connect\n");
        return 1;
      }
  printf("ready\n");
  fflush(stdout);
  char line[16];
  if (!fgets(line, sizeof line, stdin) || strncmp(line, "go", 2) != 0) return 1;
  long ops = 0, errors = 0;
  double start = now(), end = start + seconds;
  if (echo) {
    while (now() < end) {
      for (int i = 0; i < conns; i++)
        if (SSL_write(socks[i], payload, size) != size) {
          fprintf(stderr, "tlsload: write failed\n");
          return 1;
        }
      for (int i = 0; i < conns; i++) {
        if (read_exactly(socks[i], back, size) < 0) {
          fprintf(stderr, "tlsload: connection lost\n");
          return 1;
        }
        if (memcmp(back, payload, size) == 0) ops++; else errors++;
      }
    }
  } else {
    while (now() < end) {
      SSL *ssl = open_tls(ctx);
      if (!ssl) {
        errors++;
        ERR_clear_error();
        continue;
      }
      if (SSL_write(ssl, payload, size) == size && read_exactly(ssl, back, size) == 0 &&
          memcmp(back, payload, size) == 0)
        ops++;
      else
        errors++;
      close_tls(ssl);
    }
  }
  double elapsed = now() - start;
  for (int i = 0; echo && i < conns; i++) close_tls(socks[i]);
  printf("ops=%ld errors=%ld seconds=%.4f\n", ops, errors, elapsed);
  return 0;
}
