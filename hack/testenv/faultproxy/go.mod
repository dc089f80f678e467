module kata-deploy.test/faultproxy

go 1.24.0
