analyze not_utf8.ein
