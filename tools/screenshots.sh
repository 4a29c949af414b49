#!/bin/sh
# Regenerate docs/screenshots/*.png (room list, chat page and a moderated room, desktop and
# phone width) from the browser tests, which save them when
# CHATD_SCREENSHOTS is set. Run from the checkout with chatd installed.
set -e
cd "$(dirname "$0")/.."
mkdir -p docs/screenshots
CHATD_SCREENSHOTS="$(pwd)/docs/screenshots" python -m twisted.trial \
    tests.test_browser.ChatInTheBrowserTests.test_websocket_and_longpoll_pages_chat \
    tests.test_browser.ChatInTheBrowserTests.test_member_count_and_room_list \
    tests.test_browser.ChatInTheBrowserTests.test_phone_viewport \
    tests.test_browser.LiveRoomInTheBrowserTests.test_edit_delete_moderate_unread
ls -l docs/screenshots
