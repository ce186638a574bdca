#!/usr/bin/env python
#UDP时间戳客户端
from socket import *
HOST = 'localhost'
PORT = 21567
BUFSIZ = 1024
ADDR = (HOST,PORT)
udpClisock = socket(AF_INET,SOCK_DGRAM)
while True:
    data = input('> ')
    if not data:
        break
    udpClisock.sendto(data.encode(),ADDR)
    data, ADDR=udpClisock.recvfrom(BUFSIZ)
    if not data:
        break
    print(data)
udpClisock.close()
